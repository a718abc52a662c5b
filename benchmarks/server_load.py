"""Rollout-server load and weight-sync benchmark.

    python benchmarks/server_load.py                      # both parts, tiny random models
    python benchmarks/server_load.py --part load --concurrency 1,8,64 --model DIR
    python benchmarks/server_load.py --part weights --weight-params 100e6

Part `load`: a concurrency sweep with an async HTTP client (SGLang `/generate`, plain and streamed, one
request per sample as RL frameworks send them) against `bebop serve` in its own process, and
the same requests through an in-process `AsyncEngine`: tokens/s, TTFT and latency p50/p99,
and the HTTP path's throughput relative to the in-process engine (target: >= 0.9 at 64).

Part `weights`: a ~100M-parameter state dict pushed into a served model over each path —
`/update_weights_from_disk`, `/update_weights_from_tensor` (safetensors body), and a gloo
group (`/update_weights_from_distributed`, per tensor and flattened) — in GB/s, plus
pause(in_place) -> update -> continue wall time (targets: gloo >= 1 GB/s, HTTP >= 0.5 GB/s,
pause-update-continue <= 1 s). Results print as a table and go to --out as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import safetensors.torch
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bebop_spec.sampling_params import SamplingParams  # noqa: E402
from bebop_spec.server.testing import free_port  # noqa: E402
from bebop_spec.testing import make_tiny_model  # noqa: E402

SERVE = "import sys; from bebop_spec.cli import main; sys.exit(main(['serve', *sys.argv[1:]]))"


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


@contextmanager
def served(model: Path, *args: str):
    """`bebop serve` in a subprocess on a free port; yields (URL, pid)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", SERVE, "--model", str(model), "--port", str(port),
                             "--log-level", "warning", *args], cwd=REPO)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("server did not start")
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        yield url, proc.pid
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def cpu_seconds(pid: int | None = None, main_thread_only: bool = False) -> float:
    """CPU time (user + system) of process `pid` (all threads, or just its main thread, which
    runs the server's event loop), or of this whole process."""
    if pid is None:
        return time.process_time()
    stat = f"/proc/{pid}/task/{pid}/stat" if main_thread_only else f"/proc/{pid}/stat"
    fields = Path(stat).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ------------------------------------------------------------------------ load sweep
def prompts(n: int, vocab: int, length: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab - 1, (n, length), generator=g).tolist()


async def http_level(
    url: str, pid: int, reqs: list[list[int]], conc: int, max_tokens: int, stream: bool
) -> dict:
    """`reqs` through POST /generate with at most `conc` in flight (streamed or not)."""
    sem, ttft, lat, toks = asyncio.Semaphore(conc), [], [], []
    limits = httpx.Limits(max_connections=conc, max_keepalive_connections=conc)
    sp = {"max_new_tokens": max_tokens, "ignore_eos": True, "temperature": 1.0}

    async def one(c: httpx.AsyncClient, ids: list[int]) -> None:
        async with sem:
            t0 = time.perf_counter()
            if not stream:
                r = await c.post(f"{url}/generate", json={"input_ids": ids, "sampling_params": sp})
                toks.append(len(r.json()["output_ids"]))
                lat.append(time.perf_counter() - t0)
                return
            first, last = None, None
            body = {"input_ids": ids, "sampling_params": sp, "stream": True}
            async with c.stream("POST", f"{url}/generate", json=body) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        first, last = first or time.perf_counter(), line
            lat.append(time.perf_counter() - t0)
            ttft.append(first - t0)
            toks.append(len(json.loads(last[6:])["output_ids"]))

    async with httpx.AsyncClient(timeout=600, limits=limits) as c:
        t0 = time.perf_counter()
        cpu0, loop0 = cpu_seconds(pid), cpu_seconds(pid, main_thread_only=True)
        await asyncio.gather(*(one(c, ids) for ids in reqs))
        wall, cpu = time.perf_counter() - t0, cpu_seconds(pid) - cpu0
        loop = cpu_seconds(pid, main_thread_only=True) - loop0
    return summarize(conc, wall, toks, ttft, lat, cpu) | {
        "http_loop_cpu_share": loop / max(cpu, 1e-9)
    }


async def engine_level(engine, reqs: list[list[int]], conc: int, max_tokens: int) -> dict:
    sem, ttft, lat, toks = asyncio.Semaphore(conc), [], [], []
    params = SamplingParams(temperature=1.0, max_tokens=max_tokens, ignore_eos=True)

    async def one(i: int, ids: list[int]) -> None:
        async with sem:
            t0, first, last = time.perf_counter(), None, None
            async for out in engine.generate(ids, params, f"bench-{conc}-{i}"):
                first, last = first or time.perf_counter(), out
            lat.append(time.perf_counter() - t0)
            ttft.append(first - t0)
            toks.append(len(last.outputs[0].token_ids))

    t0 = time.perf_counter()
    cpu0 = cpu_seconds()
    await asyncio.gather(*(one(i, ids) for i, ids in enumerate(reqs)))
    return summarize(conc, time.perf_counter() - t0, toks, ttft, lat, cpu_seconds() - cpu0)


def summarize(
    conc: int, wall: float, toks: list[int], ttft: list[float], lat: list[float], cpu: float
) -> dict:
    """`cpu`: CPU seconds the serving process spent (robust to a shared machine, unlike wall)."""
    return {"concurrency": conc, "requests": len(toks), "tokens_per_s": sum(toks) / wall,
            "cpu_ms_per_token": 1e3 * cpu / max(1, sum(toks)),
            "ttft_p50_ms": 1e3 * pct(ttft, 0.5), "ttft_p99_ms": 1e3 * pct(ttft, 0.99),
            "latency_p50_s": pct(lat, 0.5), "latency_p99_s": pct(lat, 0.99)}  # fmt: skip


def run_load(args, model: Path) -> list[dict]:
    from bebop_spec.engine.async_engine import AsyncEngine
    from bebop_spec.engine.config import EngineConfig

    levels = [int(c) for c in args.concurrency.split(",")]
    engine_args = ["--max-num-seqs", str(max(levels)), "--draft-mode", args.draft_mode]
    mtp = model / "mtp"
    if mtp.is_dir() and args.draft_mode != "none":
        engine_args += ["--mtp", str(mtp)]
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    rows = []

    cfg = EngineConfig(model=str(model), mtp=str(mtp) if "--mtp" in engine_args else None,
                       draft_mode=None if args.draft_mode == "none" else args.draft_mode,
                       max_num_seqs=max(levels))  # fmt: skip

    def best(runs: list[dict]) -> dict:
        return max(runs, key=lambda r: r["tokens_per_s"])

    async def sweep(url: str, pid: int) -> None:
        engine = AsyncEngine(cfg)
        await engine.start()
        try:
            for c in levels:
                reqs = prompts(max(args.min_requests, 2 * c), vocab, args.prompt_len)
                runs: dict[str, list[dict]] = {"engine": [], "http": [], "http_stream": []}
                for _ in range(args.load_repeats):  # interleaved, best of: the machine is shared
                    runs["engine"].append(await engine_level(engine, reqs, c, args.max_tokens))
                    runs["http"].append(
                        await http_level(url, pid, reqs, c, args.max_tokens, stream=False)
                    )
                    runs["http_stream"].append(
                        await http_level(url, pid, reqs, c, args.max_tokens, stream=True)
                    )
                report(c, runs)
        finally:
            await engine.shutdown()

    def report(c: int, runs: dict[str, list[dict]]) -> None:
        base, plain, streamed = (best(runs[k]) for k in ("engine", "http", "http_stream"))
        cpu = {k: min(r["cpu_ms_per_token"] for r in v) for k, v in runs.items()}
        row = {"concurrency": c, "engine": base, "http": plain, "http_stream": streamed,
               "http_vs_engine": plain["tokens_per_s"] / base["tokens_per_s"],
               "http_stream_vs_engine": streamed["tokens_per_s"] / base["tokens_per_s"],
               "cpu_ms_per_token": cpu, "http_cpu_overhead": cpu["http"] / cpu["engine"] - 1}  # fmt: skip
        rows.append(row)
        print(f"c={c:4d}  tok/s engine {base['tokens_per_s']:6.0f}  http {plain['tokens_per_s']:6.0f} "
              f"({row['http_vs_engine']:.2f})  http-stream {streamed['tokens_per_s']:6.0f} "
              f"({row['http_stream_vs_engine']:.2f})  cpu ms/token engine {cpu['engine']:.2f} http "
              f"{cpu['http']:.2f} stream {cpu['http_stream']:.2f} (event loop {100 * plain['http_loop_cpu_share']:.0f}%"
              f"/{100 * streamed['http_loop_cpu_share']:.0f}% of it)  ttft p50/p99 engine {base['ttft_p50_ms']:.0f}/"
              f"{base['ttft_p99_ms']:.0f} http {streamed['ttft_p50_ms']:.0f}/{streamed['ttft_p99_ms']:.0f} ms  "
              f"latency p50/p99 engine {base['latency_p50_s']:.2f}/{base['latency_p99_s']:.2f} "
              f"http {plain['latency_p50_s']:.2f}/{plain['latency_p99_s']:.2f} s", flush=True)  # fmt: skip

    with served(model, *engine_args) as (url, pid):
        asyncio.run(sweep(url, pid))
    return rows


# ------------------------------------------------------------------------ weight sync
def big_model(root: Path, params: float) -> Path:
    """A random Qwen3 of about `params` parameters (vocab 32000, hidden 768, untied head)."""
    per_layer, fixed = 5.3e6, 2 * 32000 * 768
    layers = max(1, round((params - fixed) / per_layer))
    return make_tiny_model(
        root, vocab_size=32000, hidden_size=768, num_layers=layers, mtp_layout=None
    )


TRAINER_GROUP = "bench_group"


def memcpy_bandwidth(nbytes: int) -> float:
    """Copy bandwidth of this machine right now (GB/s), for reading the sync figures."""
    a = torch.empty(nbytes, dtype=torch.uint8).fill_(1)
    b = torch.empty_like(a)
    best = min(_timed(lambda: b.copy_(a)) for _ in range(3))
    return nbytes / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run_weights(args, root: Path) -> dict:
    from bebop_spec.server.weight_sync.group import init_custom_process_group

    src = big_model(root / "a", args.weight_params)
    new = big_model(root / "b", args.weight_params)
    tensors = safetensors.torch.load_file(str(new / "model.safetensors"))
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    nparams = sum(t.numel() for t in tensors.values())
    res = {"params": nparams, "bytes": nbytes}
    print(f"weights: {nparams / 1e6:.1f}M parameters, {nbytes / 1e9:.2f} GB", flush=True)
    res["memcpy_GB_per_s"] = memcpy_bandwidth(nbytes)
    print(f"  (this machine now: memcpy {res['memcpy_GB_per_s']:.2f} GB/s for context)", flush=True)
    with (
        served(src, "--draft-mode", "none") as (url, _),
        httpx.Client(base_url=url, timeout=600) as c,
    ):
        last: dict = {}

        def timed(label: str, fn) -> None:
            runs = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                fn()
                runs.append((time.perf_counter() - t0, dict(last)))
            wall, server = min(runs, key=lambda r: r[0])
            # disk reads are lazy (mmap): its bytes move during the swap, so no transfer figure
            recv = server.get("receive_s") if label != "disk" else None
            recv = recv or float("nan")
            res[label] = {"seconds": wall, "GB_per_s": nbytes / wall / 1e9, "server": server,
                          "transfer_GB_per_s": nbytes / recv / 1e9}  # fmt: skip
            print(f"  {label:<22} {wall:6.3f} s  end-to-end {nbytes / wall / 1e9:5.2f} GB/s  "
                  f"transfer {nbytes / recv / 1e9:5.2f} GB/s  (server: {server})", flush=True)  # fmt: skip

        def ok(r: httpx.Response) -> None:
            assert r.status_code == 200 and r.json()["success"], r.text[:500]
            last.clear()
            last.update(r.json().get("timings") or {})

        timed(
            "disk", lambda: ok(c.post("/update_weights_from_disk", json={"model_path": str(new)}))
        )
        body = safetensors.torch.save(tensors)  # the trainer serialises once per sync
        octet = {"content-type": "application/octet-stream", "content-length": str(len(body))}

        def chunks(mb: int = 4):  # one huge `content=bytes` is pathologically slow in httpx
            view = memoryview(body)
            for i in range(0, len(body), mb << 20):
                yield view[i : i + (mb << 20)]

        timed(
            "http_tensor",
            lambda: ok(
                c.post(
                    "/update_weights_from_tensor?selector=target", content=chunks(), headers=octet
                )
            ),
        )

        port = free_port()
        init = threading.Thread(target=lambda: ok(c.post("/init_weights_update_group", json={
            "master_address": "127.0.0.1", "master_port": port, "rank_offset": 1, "world_size": 2,
            "group_name": TRAINER_GROUP, "backend": "gloo"})))  # fmt: skip
        init.start()
        pg = init_custom_process_group("gloo", f"tcp://127.0.0.1:{port}", 2, 0, TRAINER_GROUP)
        init.join()
        flat = torch.cat([t.flatten().view(torch.uint8) for t in tensors.values()])

        def broadcast(flattened: bool) -> None:
            meta = {"names": list(tensors), "dtypes": [str(t.dtype)[6:] for t in tensors.values()],
                    "shapes": [list(t.shape) for t in tensors.values()], "group_name": TRAINER_GROUP,
                    "load_format": "flattened_bucket" if flattened else None}  # fmt: skip
            post = threading.Thread(
                target=lambda: ok(c.post("/update_weights_from_distributed", json=meta))
            )
            post.start()
            if flattened:
                torch.distributed.broadcast(flat, src=0, group=pg)
            else:
                for t in tensors.values():
                    torch.distributed.broadcast(t, src=0, group=pg)
            post.join()

        timed("gloo_per_tensor", lambda: broadcast(False))
        timed("gloo_flattened", lambda: broadcast(True))

        def pause_update_continue() -> None:
            ok_pause = c.post("/pause_generation", json={"mode": "in_place"})
            assert ok_pause.status_code == 200
            broadcast(True)
            assert c.post("/continue_generation", json={}).status_code == 200

        timed("pause_update_continue", pause_update_continue)
        ok(c.post("/destroy_weights_update_group", json={"group_name": TRAINER_GROUP}))
        torch.distributed.destroy_process_group(pg)
    return res


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--part", choices=["load", "weights", "all"], default="all")
    p.add_argument(
        "--model", default=None, help="model for the load sweep (default: a random 4-layer Qwen3)"
    )
    p.add_argument("--concurrency", default="1,2,4,8,16,32,64,128")
    p.add_argument("--min-requests", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--draft-mode", default="rs", choices=["rs", "to", "none"])
    p.add_argument("--weight-params", type=float, default=100e6)
    p.add_argument("--repeats", type=int, default=2, help="weight-sync repeats (best of)")
    p.add_argument("--load-repeats", type=int, default=2, help="load runs per level (best of)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args()
    results: dict = {"args": vars(args)}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if args.part in ("load", "all"):
            model = Path(args.model) if args.model else make_tiny_model(root / "load", vocab_size=512,
                                                                         hidden_size=128, num_layers=4)  # fmt: skip
            results["load"] = run_load(args, model)
            at = [r for r in results["load"] if r["concurrency"] == 64]
            if at:
                print(
                    f"HTTP / in-process tokens/s at 64 concurrent: {at[0]['http_vs_engine']:.2f} (target >= 0.90)"
                )
        if args.part in ("weights", "all"):
            results["weights"] = run_weights(args, root)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
