"""`bebop mtp data`: the embedded engine in-process vs a server over HTTP (`--server`).

    python benchmarks/data_server.py                         # demo model, 16 in flight
    python benchmarks/data_server.py --model DIR --num-prompts 64 --max-tokens 256 --api sglang

The same demo-corpus prompts, sampled both ways without speculation: `generate_dataset`
(an in-process LLM with max_num_seqs = --concurrency) and `generate_remote_dataset` against
`bebop serve` in a subprocess (--concurrency requests in flight). Reported per path: wall
time of the whole call, response tokens/s, and tokens/s after subtracting the fixed cost
measured by a one-prompt, one-token run (model load in-process; /v1/models + tokenizer check
over HTTP); plus whether both wrote the same dataset (they should: same per-prompt seeds).
Results print as a table and go to --out as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch, as `bebop mtp` sets it
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from server_load import served  # noqa: E402  (benchmarks/: `bebop serve` in a subprocess)

from bebop_spec.models.defaults import resolve_model  # noqa: E402
from bebop_spec.train.data import read_dataset  # noqa: E402
from bebop_spec.train.remote_data import RemoteDataConfig, generate_remote_dataset  # noqa: E402
from bebop_spec.train.selfdistill import DataConfig, generate_dataset  # noqa: E402


def timed(run, data: DataConfig) -> tuple[float, Path]:
    t0 = time.perf_counter()
    run(data)
    return time.perf_counter() - t0, Path(data.out)


def measure(name: str, run, data: dict, work: Path) -> dict:
    """Fixed cost (1 prompt x 1 token, which also warms up), then the full run."""
    fixed, _ = timed(run, DataConfig(**{**data, "num_prompts": 1, "max_tokens": 1,
                                        "out": str(work / f"{name}-fixed")}))  # fmt: skip
    wall, out = timed(run, DataConfig(**{**data, "out": str(work / name)}))
    ds = read_dataset(out)
    toks = ds.meta.num_response_tokens
    return {"path": name, "sequences": len(ds), "response_tokens": toks, "wall_s": wall,
            "fixed_s": fixed, "tokens_per_s": toks / wall,
            "tokens_per_s_net": toks / max(wall - fixed, 1e-9), "out": out}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--model", default="demo", help="target dir, or 'demo' (default)")
    p.add_argument("--api", default="openai", choices=["openai", "sglang"])
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--num-prompts", type=int, default=16, help="per demo-corpus domain")
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--out", default=str(REPO / "benchmarks/results/data_server.json"))
    args = p.parse_args()

    model, _ = resolve_model(args.model, None)
    data = dict(model=model, out="", num_prompts=args.num_prompts, max_tokens=args.max_tokens,
                temperature=1.0, seed=0, max_num_seqs=args.concurrency, dtype=args.dtype)  # fmt: skip
    serve_args = ["--draft-mode", "none", "--max-num-seqs", str(args.concurrency), "--dtype",
                  args.dtype, "--served-model-name", "bench"]  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp, served(Path(model), *serve_args) as (url, _):
        work = Path(tmp)

        def remote(cfg: DataConfig) -> None:
            generate_remote_dataset(RemoteDataConfig(cfg, servers=(url,), api=args.api,
                                                     concurrency=args.concurrency),
                                    progress=False)  # fmt: skip

        rows = [measure("in_process", lambda c: generate_dataset(c, progress=False), data, work),
                measure(f"server_{args.api}", remote, data, work)]  # fmt: skip
        a, b = (read_dataset(r.pop("out")) for r in rows)
        same = all(torch.equal(getattr(a, k), getattr(b, k))
                   for k in ("input_ids", "loss_mask", "offsets"))  # fmt: skip

    print(f"model {model}, {args.num_prompts} prompts x 3 domains, max_tokens "
          f"{args.max_tokens}, {args.concurrency} in flight, torch threads "
          f"{torch.get_num_threads()}")  # fmt: skip
    print(f"{'path':<16}{'seqs':>6}{'tokens':>8}{'wall s':>8}{'fixed s':>9}{'tok/s':>8}"
          f"{'net tok/s':>11}")  # fmt: skip
    for r in rows:
        print(f"{r['path']:<16}{r['sequences']:>6}{r['response_tokens']:>8}{r['wall_s']:>8.2f}"
              f"{r['fixed_s']:>9.2f}{r['tokens_per_s']:>8.0f}{r['tokens_per_s_net']:>11.0f}")  # fmt: skip
    ratio = rows[1]["tokens_per_s_net"] / rows[0]["tokens_per_s_net"]
    print(f"server / in-process (net tokens/s): {ratio:.2f}; identical datasets: {same}")
    result = {"model": str(model), "api": args.api, "concurrency": args.concurrency,
              "num_prompts_per_domain": args.num_prompts, "max_tokens": args.max_tokens,
              "dtype": args.dtype, "torch_threads": torch.get_num_threads(),
              "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "rows": rows,
              "server_vs_in_process_net": ratio, "identical_datasets": same}  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
