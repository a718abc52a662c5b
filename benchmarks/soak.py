"""Soak: many concurrent streaming clients, some hanging up mid-stream, against `bebop serve`
in its own process; checks nothing leaks and reports the figures.

    python benchmarks/soak.py                          # demo model if built, else a tiny one
    python benchmarks/soak.py --model DIR --clients 256 --rounds 5 --tokens 64 --drop 0.1

Each round starts `--clients` streaming /generate requests at once (`--drop` of them close
the connection after 2-9 events). Invariants checked after every round: zero errors and
complete streams (all tokens, finish reason, `[DONE]`) for the clients that stay; the server
reports running = waiting = 0; at the end, all `--max-num-seqs` KV slots can be taken at
once (no leaked slot) and resident memory (VmRSS of the server's pid, from /proc) after the
last round is within `--rss-slack-mib` of the plateau (the highest value after round 2).
Exit status 1 if any invariant fails. Results print as JSON and go to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from server_load import pct, served  # noqa: E402

TOKEN = "soak-token"


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(x.split()[1]) for x in f if x.startswith("VmRSS:")) / 1024


async def client(c: httpx.AsyncClient, i: int, tokens: int, drop_after: int | None) -> dict:
    body = {"input_ids": [1 + i % 50, 2, 3, 4], "stream": True,
            "sampling_params": {"max_new_tokens": tokens, "ignore_eos": True}}  # fmt: skip
    t0, first, events, error = time.perf_counter(), None, [], None
    try:
        async with c.stream("POST", "/generate", json=body) as r:
            if r.status_code != 200:
                return {"error": f"HTTP {r.status_code}", "dropped": False}
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    first = first or time.perf_counter()
                    events.append(line[6:])
                    if drop_after is not None and len(events) >= drop_after:
                        return {"dropped": True}
    except httpx.HTTPError as exc:
        return {"error": f"{type(exc).__name__}: {exc}", "dropped": False}
    try:
        last = json.loads(events[-2])
        ok = (events[-1] == "[DONE]" and "error" not in last
              and len(last["output_ids"]) == tokens
              and last["meta_info"]["finish_reason"]["type"] == "length")  # fmt: skip
        error = None if ok else f"malformed stream end: {events[-2:]}"
    except (IndexError, KeyError, ValueError) as exc:
        error = f"malformed stream: {exc}"
    return {
        "error": error,
        "dropped": False,
        "ttft": first - t0,
        "latency": time.perf_counter() - t0,
    }


async def round_(url: str, n: int, tokens: int, drop: float) -> dict:
    every = max(1, round(1 / drop)) if drop > 0 else 0
    limits = httpx.Limits(max_connections=n + 16)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as c:
        t0 = time.perf_counter()
        res = await asyncio.gather(*(client(c, i, tokens, 2 + i % 8 if every and i % every == 0
                                            else None) for i in range(n)))  # fmt: skip
        wall = time.perf_counter() - t0
    stayed = [r for r in res if not r["dropped"]]
    errors = [r["error"] for r in stayed if r["error"]]
    ttft = [r["ttft"] for r in stayed if "ttft" in r]
    return {"clients": n, "disconnected": n - len(stayed), "errors": len(errors),
            "first_errors": errors[:3], "wall_s": round(wall, 2),
            "tokens_per_s": round(tokens * len(stayed) / wall, 1),
            "ttft_p50_s": round(pct(ttft, 0.5), 3), "ttft_p99_s": round(pct(ttft, 0.99), 3)}  # fmt: skip


def engine_state(url: str) -> dict:
    info = httpx.get(f"{url}/get_server_info", timeout=30).json()
    return info["internal_states"][0] | {"max_num_seqs": info["max_num_seqs"]}


async def all_slots_free(url: str, slots: int) -> bool:
    """Start `slots` long requests; True if all of them run at once (none stuck waiting)."""
    auth = {"Authorization": f"Bearer {TOKEN}"}
    body = {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 100, "ignore_eos": True}}
    async with httpx.AsyncClient(base_url=url, timeout=600,
                                 limits=httpx.Limits(max_connections=slots + 8)) as c:  # fmt: skip
        await c.post("/pause_generation", json={"mode": "in_place"}, headers=auth)
        tasks = [asyncio.create_task(c.post("/generate", json=body)) for _ in range(slots)]
        deadline, full = time.monotonic() + 120, False
        await c.post("/continue_generation", json={}, headers=auth)
        while time.monotonic() < deadline and not full:
            st = (await c.get("/get_server_info")).json()["internal_states"][0]
            full = st["num_running"] == slots
            await asyncio.sleep(0.01)
        await c.post("/abort_request", json={"abort_all": True}, headers=auth)
        await asyncio.gather(*tasks, return_exceptions=True)
    return full


def default_model() -> tuple[Path, str]:
    from bebop_spec.demo.build import DemoBuildConfig, is_built

    cfg = DemoBuildConfig()
    if is_built(cfg):
        return cfg.target_dir, "demo"
    from bebop_spec.testing import make_tiny_model

    tiny = make_tiny_model(Path(tempfile.mkdtemp()) / "m", with_tokenizer=True, seed=3)
    return tiny, "tiny (demo model not built)"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--clients", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--drop", type=float, default=0.1)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--rss-slack-mib", type=float, default=64)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "soak.json"))
    args = ap.parse_args(argv)
    model, kind = (Path(args.model), "given") if args.model else default_model()
    head = next(
        (d for d in (model / "mtp", model.parent / "head") if (d / "model.safetensors").exists()),
        None,
    )  # tiny models / the demo layout
    mtp = ["--mtp", str(head)] if head else ["--draft-mode", "none"]
    report: dict = {"model": str(model), "model_kind": kind, "rounds": []}
    flags = ["--admin-token", TOKEN, "--max-num-seqs", str(args.max_num_seqs), *mtp]
    with served(model, *flags) as (url, pid):
        report["rss_start_mib"] = round(rss_mib(pid), 1)
        for _ in range(args.rounds):
            r = asyncio.run(round_(url, args.clients, args.tokens, args.drop))
            time.sleep(0.5)  # disconnect aborts are processed between engine steps
            st = engine_state(url)
            r |= {"running_after": st["num_running"], "waiting_after": st["num_waiting"],
                  "rss_mib": round(rss_mib(pid), 1)}  # fmt: skip
            report["rounds"].append(r)
            print(json.dumps(r), flush=True)
        report["all_slots_free"] = asyncio.run(all_slots_free(url, args.max_num_seqs))
        st = engine_state(url)
        report["idle_at_end"] = st["num_running"] == st["num_waiting"] == 0
    rounds = report["rounds"]
    plateau = max(r["rss_mib"] for r in rounds[1:2] or rounds)
    report["rss_plateau_mib"] = plateau
    report["rss_growth_after_plateau_mib"] = round(rounds[-1]["rss_mib"] - plateau, 1)
    report["ok"] = bool(
        all(r["errors"] == 0 and r["running_after"] == r["waiting_after"] == 0 for r in rounds)
        and report["all_slots_free"] and report["idle_at_end"]
        and report["rss_growth_after_plateau_mib"] < args.rss_slack_mib
    )  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k != "rounds"}, indent=1))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
