"""Head-training throughput: data-parallel ranks, or float32 vs bfloat16 compute.

    python benchmarks/train_throughput.py                  # ranks: demo target, data, head
    python benchmarks/train_throughput.py --compare dtype --model DIR --data DIR \
        --heldout DIR --init-from '' --draft-vocab HEAD_DIR --threads 2 --steps 20

`--compare ranks` (default): the same head (default: the demo's shipped head) fine-tuned with
the same global batch by 1 rank, 2 ranks (torchrun, gloo), 2 ranks with the target's layers
FSDP2-sharded (--shard-target), and 1 rank reading the target's hidden states from a cache
(--cache-hiddens, built in the same run before the timed steps); every rank runs one torch
thread (OMP_NUM_THREADS=1), so 2 ranks use 2 cores.
`--compare dtype`: 1 process with --threads threads, the target and the head's forward in
float32, then the target in bfloat16 with the head's matmuls under bfloat16 autocast (its
master weights and optimiser moments stay float32: --dtype bfloat16 --compute-dtype
bfloat16), same data, seed and steps. bf16 pays only where the hardware has bf16 matrix
units (bebop_spec.hardware.cpu_has_bf16_units is printed).

Throughput is tokens (real tokens of the global batches) and training chains per second over
the steps after the first (warm-up excluded), from each run's train_log.jsonl. Each trained
head is then scored on held-out data (analytic acceptance, rs at T=1,
bebop_spec.train.evaluate; the held-out set is sampled from the demo corpus unless --heldout
is given). Prints a table, the machine's load before the runs, and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
DEMO = Path.home() / ".cache" / "bebop" / "demo"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(name: str, world: int, extra: list[str], args: argparse.Namespace, out: Path,
          threads: int = 1) -> dict:  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world),
           "--master-port", str(_free_port()), "-m", "bebop_spec.cli", "mtp", "train",
           "--model", args.model, "--data", args.data, "--out", str(out), "--overwrite",
           "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--seq-len",
           str(args.seq_len), "--log-every", "1", "--save-every", "0", "--threads",
           str(threads), "--quiet", *(["--init-from", args.init_from] if args.init_from else []),
           *(["--draft-vocab", args.draft_vocab] if args.draft_vocab else []),
           *(["--loss", args.loss] if args.loss else []), *extra]  # fmt: skip
    env = os.environ | {"OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE"}
    subprocess.run(cmd, check=True, env=env, capture_output=True, text=True)
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    seconds = log[-1]["elapsed_s"] - log[0]["elapsed_s"]
    return {
        "run": name,
        "ranks": world,
        "threads": threads,
        "flags": extra,
        "steps": len(log),
        "tokens_per_s": sum(r["tokens"] for r in log[1:]) / seconds,
        "chains_per_s": sum(r["num_chains"] for r in log[1:]) / seconds,
        "final_loss": log[-1]["loss"],
    }


def heldout_acceptance(args: argparse.Namespace, head: Path, heldout: str) -> dict:
    """Analytic rs acceptance at T=1 over all held-out chains (one thread)."""
    import torch

    from bebop_spec.train.evaluate import EvalConfig, evaluate

    torch.set_num_threads(1)
    cfg = EvalConfig(model=args.model, mtp=str(head), data=heldout, temperatures=(1.0,),
                     modes=("rs",), measured=False, seq_len=args.seq_len)  # fmt: skip
    rows = evaluate(cfg, progress=False)
    count = sum(r.count for r in rows)
    return {
        "chains": count,
        "accepted_length": sum(r.accepted_length * r.count for r in rows) / count,
        "acceptance_rate": sum(r.acceptance_rate * r.count for r in rows) / count,
    }


def _sample_heldout(args: argparse.Namespace, out: Path) -> str:
    cmd = [sys.executable, "-m", "bebop_spec.cli", "mtp", "data", "--model", args.model,
           "--out", str(out), "--split", "heldout", "--num-prompts", "16", "--max-tokens",
           "128", "--quiet"]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return str(out)


def runs(args: argparse.Namespace, tmp: Path) -> list[tuple[str, int, list[str], int]]:
    """(name, ranks, extra trainer flags, threads) of each run; the first is the baseline."""
    if args.compare == "dtype":
        bf16 = ["--dtype", "bfloat16", "--compute-dtype", "bfloat16"]
        return [("float32", 1, [], args.threads), ("bfloat16", 1, bf16, args.threads)]
    return [("1 rank", 1, [], 1), ("2 ranks", 2, [], 1),
            ("2 ranks, FSDP2 target", 2, ["--shard-target"], 1),
            ("1 rank, cached hiddens", 1, ["--cache-hiddens", str(tmp / "cache")], 1)]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--compare", choices=["ranks", "dtype"], default="ranks")
    ap.add_argument("--model", default=str(DEMO / "target"))
    ap.add_argument("--data", default=str(DEMO / "head" / "data"))
    ap.add_argument("--init-from", default=str(DEMO / "head"), help="'' for a fresh head")
    ap.add_argument("--heldout", default=None, help="held-out dataset (default: sample one)")
    ap.add_argument("--draft-vocab", default=None, metavar="DIR", help="train over its vocabulary")
    ap.add_argument("--loss", default=None, help="trainer objective (default: the trainer's)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (--compare dtype)")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--out", default=None, help="default: results/train_<compare>.json")
    args = ap.parse_args()
    from bebop_spec.hardware import cpu_has_bf16_units

    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rows = [train(name, w, extra, args, tmp / f"run{i}", threads)
                for i, (name, w, extra, threads) in enumerate(runs(args, tmp))]  # fmt: skip
        heldout = args.heldout or _sample_heldout(args, tmp / "heldout")
        for i, row in enumerate(rows):
            row["heldout"] = heldout_acceptance(args, tmp / f"run{i}" / "head", heldout)
    base = rows[0]["tokens_per_s"]
    print(f"load average before the runs: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} "
          f"({os.cpu_count()} CPUs; bf16 matrix units: {cpu_has_bf16_units()})")  # fmt: skip
    print(f"{'run':<24} {'tokens/s':>9} {'chains/s':>9} {'speedup':>8} {'final loss':>11} "
          f"{'held-out acc. rate':>19}")  # fmt: skip
    for r in rows:
        print(f"{r['run']:<24} {r['tokens_per_s']:>9.1f} {r['chains_per_s']:>9.1f} "
              f"{r['tokens_per_s'] / base:>7.2f}x {r['final_loss']:>11.5f} "
              f"{100 * r['heldout']['acceptance_rate']:>18.2f}%")  # fmt: skip
    gap = 100 * abs(rows[1]["heldout"]["acceptance_rate"] - rows[0]["heldout"]["acceptance_rate"])
    print(f"{rows[1]['run']} / {rows[0]['run']}: {rows[1]['tokens_per_s'] / base:.2f}x tokens/s "
          f"(same global batch {args.batch_size}, {args.steps} steps); held-out acceptance rate "
          f"differs by {gap:.3f} points")  # fmt: skip
    result = {"args": vars(args), "load_average": load, "cpus": os.cpu_count(),
              "bf16_units": cpu_has_bf16_units(), "rows": rows,
              "speedup": rows[1]["tokens_per_s"] / base, "heldout_gap_points": gap}  # fmt: skip
    out = Path(args.out or RESULTS / f"train_{args.compare}.json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"results -> {out}")


if __name__ == "__main__":
    main()
