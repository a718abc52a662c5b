"""Data-parallel head training throughput: 1 rank vs 2 ranks (torchrun, gloo), one thread each.

    python benchmarks/train_ddp.py                    # demo target + its self-distillation data
    python benchmarks/train_ddp.py --model DIR --data DIR --steps 20 --batch-size 16

Both runs train the same fresh head with the same global batch; each rank runs one torch
thread (OMP_NUM_THREADS=1 --threads 1), so 2 ranks use 2 cores. Throughput is training chains
(teacher-forced γ-chains, one per response position) per second over the steps after the
first (warm-up excluded), from each run's train_log.jsonl. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
DEMO = Path.home() / ".cache" / "bebop" / "demo"


def run(world: int, args: argparse.Namespace, out: Path) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world),
           "--master-port", str(29500 + world), "-m", "bebop_spec.cli", "mtp", "train",
           "--model", args.model, "--data", args.data, "--out", str(out), "--overwrite",
           "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--seq-len",
           str(args.seq_len), "--log-every", "1", "--save-every", "0", "--threads", "1",
           "--quiet"]  # fmt: skip
    env = os.environ | {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    subprocess.run(cmd, check=True, env=env, capture_output=True, text=True)
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    chains = sum(r["num_chains"] for r in log[1:])
    seconds = log[-1]["elapsed_s"] - log[0]["elapsed_s"]
    return {
        "ranks": world,
        "steps": len(log),
        "chains_per_s": chains / seconds,
        "final_loss": log[-1]["loss"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(DEMO / "target"))
    ap.add_argument("--data", default=str(DEMO / "head" / "data"))
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--out", default=str(RESULTS / "train_ddp.json"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run(w, args, Path(tmp) / f"w{w}") for w in (1, 2)]
    speedup = rows[1]["chains_per_s"] / rows[0]["chains_per_s"]
    print(f"{'ranks':>5} {'chains/s':>10} {'final loss':>11}")
    for r in rows:
        print(f"{r['ranks']:>5} {r['chains_per_s']:>10.1f} {r['final_loss']:>11.4f}")
    print(f"2 ranks / 1 rank: {speedup:.2f}x (same global batch {args.batch_size})")
    Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows,
                                          "speedup": speedup}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
