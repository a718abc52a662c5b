"""Load with disconnects, resident memory, and crash containment over HTTP (fast versions;
the 256-client run on the demo model is `benchmarks/soak.py`).

Invariants: with 64 concurrent streaming clients of which 10% hang up mid-stream, every
client that stays gets a well-formed, complete stream (JSON events, all its tokens, a
finish reason, `[DONE]`) and no error; afterwards running = waiting = 0, no request is
still tracked, every KV slot is free, and the server's resident memory (VmRSS from /proc;
the server runs in this process) after three more rounds is within 64 MiB of its level
after the first. A request whose engine step raises fails with a clear error (500 body or
in-band error event naming the exception) and the engine keeps serving.

Run: python -m pytest -q tests/server/test_reliability_load.py
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from bebop_spec.server.testing import serve_model

CLIENTS, DROP_EVERY, TOKENS = 64, 10, 48  # 64 streams; clients 0, 10, 20, ... hang up
RSS_SLACK_MIB = 64


@pytest.fixture(scope="module")
def server(tiny_model):
    engine = {"max_num_seqs": 64, "max_model_len": 128}
    with serve_model(str(tiny_model), str(tiny_model / "mtp"), engine=engine) as (srv, state):
        yield srv, state


def rss_mib(pid: int | str = "self") -> float:
    """Resident set size of a process, from /proc/<pid>/status."""
    with open(f"/proc/{pid}/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kib / 1024


async def stream_client(c: httpx.AsyncClient, i: int, drop_after: int | None) -> dict:
    """One streaming client over /generate (even i) or /v1/completions (odd i); hangs up
    after `drop_after` events when given. Returns what it saw."""
    if i % 2:
        route = "/v1/completions"
        body = {"prompt": [1 + i % 60, 2, 3], "stream": True, "max_tokens": TOKENS,
                "ignore_eos": True, "stream_options": {"include_usage": True}}  # fmt: skip
    else:
        route = "/generate"
        body = {"input_ids": [1 + i % 60, 2, 3], "stream": True,
                "sampling_params": {"max_new_tokens": TOKENS, "ignore_eos": True}}  # fmt: skip
    events: list[str] = []
    async with c.stream("POST", route, json=body) as r:
        status = r.status_code
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
                if drop_after is not None and len(events) >= drop_after:
                    break  # leaving the block closes the connection mid-stream
    return {"route": route, "status": status, "events": events, "dropped": drop_after is not None}


def check_complete(res: dict) -> None:
    """A stream that ran to the end is well-formed and carries all TOKENS tokens."""
    assert res["status"] == 200 and res["events"][-1] == "[DONE]", res["events"][-3:]
    payloads = [json.loads(e) for e in res["events"][:-1]]
    assert not any("error" in p for p in payloads)
    if res["route"] == "/generate":
        last = payloads[-1]
        assert len(last["output_ids"]) == TOKENS
        assert last["meta_info"]["finish_reason"]["type"] == "length"
    else:
        finals = [ch for p in payloads for ch in p["choices"] if ch.get("finish_reason")]
        assert [ch["finish_reason"] for ch in finals] == ["length"]
        assert payloads[-1]["usage"]["completion_tokens"] == TOKENS


async def one_round(url: str) -> list[dict]:
    limits = httpx.Limits(max_connections=CLIENTS + 8)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as c:
        jobs = [stream_client(c, i, 3 + i % 5 if i % DROP_EVERY == 0 else None)
                for i in range(CLIENTS)]  # fmt: skip
        return await asyncio.gather(*jobs)


def wait_idle(state, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while state.engine.num_running + state.engine.num_waiting or state.generate.active:
        assert time.monotonic() < deadline, "requests left behind after the load"
        time.sleep(0.05)


def test_64_streams_with_10pct_disconnects(server):
    """4 rounds of 64 concurrent streams (7 disconnect after 3-7 events): zero errors for
    the 57 that stay, nothing left running/waiting, all 64 KV slots free, and VmRSS after
    rounds 2-4 within 64 MiB of its value after round 1."""
    srv, state = server
    rss = []
    t0 = time.perf_counter()
    for _ in range(4):
        results = asyncio.run(one_round(srv.url))
        stayed = [r for r in results if not r["dropped"]]
        assert len(stayed) == CLIENTS - len(range(0, CLIENTS, DROP_EVERY))
        for res in stayed:
            check_complete(res)
        wait_idle(state)
        sched = state.engine.engine.scheduler
        assert sched.blocks.num_free == sched.blocks.num_blocks
        assert not state.engine.engine.requests and not state.engine._streams
        rss.append(rss_mib())
    print(f"\nload: 4 x {CLIENTS} streams in {time.perf_counter() - t0:.1f} s; "
          f"VmRSS per round {[round(x) for x in rss]} MiB")  # fmt: skip
    assert max(rss[1:]) - rss[0] < RSS_SLACK_MIB, rss


def test_step_failure_fails_its_request_and_engine_keeps_serving(server):
    """A decode step that raises (injected once) fails the requests in that step with a
    clear error — a 500 whose message names the exception for a plain request, an in-band
    `error` event then `[DONE]` for a stream that had started (a 500 if the step failed
    before its first event could be sent) — and the engine then serves new requests;
    no slot leaks."""
    srv, state = server
    runner = state.engine.engine.runner
    original, armed = runner.decode, {"on": True}

    def poisoned(seqs, *args):  # fails every step that holds the poisoned request
        if armed["on"] and any(s.prompt_ids[0] == 63 for s in seqs):
            raise RuntimeError("poisoned step")
        return original(seqs, *args)

    runner.decode = poisoned
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            body = {"input_ids": [63, 1], "sampling_params": {"max_new_tokens": 8}}
            r = c.post("/generate", json=body)
            assert r.status_code == 500, r.text
            err = r.json()["error"]
            assert "poisoned step" in err["message"] and err["code"] == "engine_step_failed"
            armed["on"] = True
            with c.stream("POST", "/generate", json=body | {"stream": True}) as s:
                s.read()
            if s.status_code == 500:  # the step failed before the first event was sent
                assert "poisoned step" in s.json()["error"]["message"]
            else:
                events = [x[6:] for x in s.text.splitlines() if x.startswith("data: ")]
                assert events[-1] == "[DONE]" and "poisoned step" in events[-2]
            ok = c.post("/generate", json={"input_ids": [5, 6], "sampling_params": {"max_new_tokens": 8,
                                                                                    "ignore_eos": True}})  # fmt: skip
            assert ok.status_code == 200 and len(ok.json()["output_ids"]) == 8
            assert c.get("/health").status_code == 200
    finally:
        runner.decode = original
    wait_idle(state)
    assert state.engine.engine.blocks.num_free == state.engine.engine.blocks.num_blocks
