"""Data-parallel head training throughput: 1 rank vs 2 ranks (torchrun, gloo), one thread each.

    python benchmarks/train_ddp.py                    # demo target, its data, its head
    python benchmarks/train_ddp.py --model DIR --data DIR --init-from DIR --steps 20

Every run fine-tunes the same head (default: the demo's shipped head) with the same global
batch; each rank runs one torch thread (OMP_NUM_THREADS=1 --threads 1), so 2 ranks use 2
cores. Rows: 1 rank; 2 ranks; 2 ranks with the target's layers FSDP2-sharded
(--shard-target); 1 rank reading the target's hidden states from a cache (--cache-hiddens,
built in the same run before the timed steps). Throughput is tokens (real tokens of the
global batches) and training chains per second over the steps after the first (warm-up
excluded), from each run's train_log.jsonl. Each trained head is then scored on held-out
data (analytic acceptance, rs at T=1, bebop_spec.train.evaluate; the held-out set is
sampled from the demo corpus unless --heldout is given). Prints a table, the machine's load
before the runs, and writes JSON.
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


def train(name: str, world: int, extra: list[str], args: argparse.Namespace, out: Path) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world),
           "--master-port", str(_free_port()), "-m", "bebop_spec.cli", "mtp", "train",
           "--model", args.model, "--data", args.data, "--out", str(out), "--overwrite",
           "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--seq-len",
           str(args.seq_len), "--log-every", "1", "--save-every", "0", "--threads", "1",
           "--quiet", *(["--init-from", args.init_from] if args.init_from else []),
           *extra]  # fmt: skip
    env = os.environ | {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    subprocess.run(cmd, check=True, env=env, capture_output=True, text=True)
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    seconds = log[-1]["elapsed_s"] - log[0]["elapsed_s"]
    return {
        "run": name,
        "ranks": world,
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(DEMO / "target"))
    ap.add_argument("--data", default=str(DEMO / "head" / "data"))
    ap.add_argument("--init-from", default=str(DEMO / "head"), help="'' for a fresh head")
    ap.add_argument("--heldout", default=None, help="held-out dataset (default: sample one)")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--out", default=str(RESULTS / "train_ddp.json"))
    args = ap.parse_args()
    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        runs = [("1 rank", 1, []), ("2 ranks", 2, []), ("2 ranks, FSDP2 target", 2,
                ["--shard-target"]), ("1 rank, cached hiddens", 1,
                ["--cache-hiddens", str(tmp / "cache")])]  # fmt: skip
        rows = [train(name, w, extra, args, tmp / f"run{i}")
                for i, (name, w, extra) in enumerate(runs)]  # fmt: skip
        heldout = args.heldout or _sample_heldout(args, tmp / "heldout")
        for i, row in enumerate(rows):
            row["heldout"] = heldout_acceptance(args, tmp / f"run{i}" / "head", heldout)
    base = rows[0]["tokens_per_s"]
    print(f"load average before the runs: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} "
          f"({os.cpu_count()} CPUs)")  # fmt: skip
    print(f"{'run':<24} {'tokens/s':>9} {'chains/s':>9} {'speedup':>8} {'final loss':>11} "
          f"{'held-out acc. rate':>19}")  # fmt: skip
    for r in rows:
        print(f"{r['run']:<24} {r['tokens_per_s']:>9.1f} {r['chains_per_s']:>9.1f} "
              f"{r['tokens_per_s'] / base:>7.2f}x {r['final_loss']:>11.5f} "
              f"{100 * r['heldout']['acceptance_rate']:>18.2f}%")  # fmt: skip
    gap = 100 * abs(rows[1]["heldout"]["acceptance_rate"] - rows[0]["heldout"]["acceptance_rate"])
    print(f"2 ranks / 1 rank: {rows[1]['tokens_per_s'] / base:.2f}x tokens/s (same global batch "
          f"{args.batch_size}); held-out acceptance rate differs by {gap:.3f} points")  # fmt: skip
    result = {"args": vars(args), "load_average": load, "cpus": os.cpu_count(), "rows": rows,
              "speedup": rows[1]["tokens_per_s"] / base, "heldout_gap_points": gap}  # fmt: skip
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
