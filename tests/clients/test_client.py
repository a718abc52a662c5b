"""bebop-client over real loopback HTTP: retry/backoff/error mapping against a tiny FastAPI
app that answers what each test scripts (503 + Retry-After, 400, slow replies, dead ports),
then generation, abort, weight sync (HTTP body, disk, gloo group) and metrics against the
real Bebop server on a tiny random model."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import safetensors.numpy
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

REPO = Path(__file__).resolve().parents[2]
try:
    import bebop_client  # noqa: F401  (installed with `pip install ./clients`)
except ImportError:
    sys.path.insert(0, str(REPO / "clients"))

from bebop_client import (  # noqa: E402
    AsyncRolloutClient,
    EndpointPool,
    RequestRejected,
    RequestTimeout,
    RetryPolicy,
    RolloutClient,
    ServerOverloaded,
    ServerUnreachable,
    VersionConflict,
    WeightSync,
    WeightSyncError,
    parse_metrics,
)
from bebop_client.base import ClientBase  # noqa: E402
from bebop_client.transport import Attempts, parse_retry_after  # noqa: E402

from bebop_spec.server.testing import ServerThread, free_port  # noqa: E402

FAST = RetryPolicy(max_attempts=4, initial_backoff_s=0.01, jitter=0.0, down_for_s=30.0)
PROMPT = [3, 1, 4, 1, 5]


# --------------------------------------------------------------------------- scripted app
def ok_reply(rid: str, n: int = 3) -> dict:
    ids = list(range(1, n + 1))
    return {"text": "", "output_ids": ids, "meta_info": {
        "id": rid, "finish_reason": {"type": "length", "length": n}, "prompt_tokens": 5,
        "completion_tokens": n, "weight_version": "7",
        "weight_versions": [{"version": "6", "start": 0, "end": 1}, {"version": "7", "start": 1, "end": n}],
        "output_token_logprobs": [[-0.5 * i, t, None] for i, t in enumerate(ids)],
        "spec_accept_rate": 0.5, "spec_accept_length": 2.0, "spec_verify_ct": 2}}  # fmt: skip


def scripted_app(log: dict) -> FastAPI:
    """Each /generate call pops the next action for its rid: "ok", "503:<retry-after>",
    "400", "slow"; every call is logged with its arrival time."""
    app = FastAPI()

    @app.post("/generate")
    async def generate(req: Request):
        body = await req.json()
        rid = body["rid"]
        log.setdefault("calls", []).append((rid, time.monotonic(), body))
        actions = log.setdefault("script", {}).get(rid.split("-retry")[0], ["ok"])
        action = actions.pop(0) if len(actions) > 1 else actions[0]
        if action.startswith("503"):
            return JSONResponse({"error": {"message": "engine queue full", "code": 503}}, 503,
                                headers={"Retry-After": action.split(":")[1]})  # fmt: skip
        if action == "400":
            return JSONResponse({"error": {"message": "prompt of 9000 tokens exceeds max_model_len",
                                           "type": "invalid_request_error", "param": "input_ids",
                                           "code": 400}}, 400)  # fmt: skip
        if action == "slow":
            await asyncio.sleep(1.5)
        return ok_reply(rid)

    @app.post("/abort_request")
    async def abort(req: Request):
        log.setdefault("aborts", []).append((await req.json()).get("rid"))
        return {"success": True, "num_aborted": 1}

    @app.get("/get_weight_version")
    async def version():
        return {"weight_version": log.get("version", "7")}

    @app.post("/{path}")
    async def other(path: str):
        log.setdefault("admin", []).append(path)
        return {"success": True, "message": "ok", "weight_version": "8"}

    return app


@pytest.fixture(scope="module")
def fakes():
    """Two scripted servers; each test resets their logs."""
    logs = [{}, {}]
    with ServerThread(scripted_app(logs[0])) as a, ServerThread(scripted_app(logs[1])) as b:
        yield [a.url, b.url], logs


@pytest.fixture
def fake(fakes):
    urls, logs = fakes
    for log in logs:
        log.clear()
    return urls, logs


def test_503_is_retried_honouring_retry_after(fake):
    """Two 503s with Retry-After: 0.3 then a reply: three tries on the same rid, each retry
    waiting the server's 0.3 s (not the 0.01 s backoff); the Sample is fully parsed."""
    (url, _), (log, _) = fake
    log["script"] = {"g": ["503:0.3", "503:0.3", "ok"]}
    with RolloutClient(url, retry=FAST) as client:
        (s,) = client.generate(PROMPT, {"max_new_tokens": 3}, rid="g")
    times = [t for rid, t, _ in log["calls"]]
    assert [rid for rid, _, _ in log["calls"]] == ["g"] * 3
    assert all(b - a >= 0.29 for a, b in zip(times, times[1:], strict=False))
    assert s.token_ids == [1, 2, 3] and s.logprobs == [0.0, -0.5, -1.0]
    assert s.weight_versions == ["6", "7", "7"] and s.mixed_versions and s.truncated
    assert (s.spec_accept_rate, s.spec_accept_length, s.spec_verify_ct) == (0.5, 2.0, 2)
    body = log["calls"][0][2]
    assert body["input_ids"] == PROMPT and body["return_logprob"] is True
    assert "n" not in body["sampling_params"]


def test_overload_and_rejection_errors(fake):
    """503 forever -> ServerOverloaded after max_attempts; 400 -> RequestRejected carrying
    the server's OpenAI-style message and param, after exactly one try."""
    (url, _), (log, _) = fake
    log["script"] = {"busy": ["503:0"], "bad": ["400"]}
    with RolloutClient(url, retry=FAST) as client:
        with pytest.raises(ServerOverloaded) as over:
            client.generate(PROMPT, rid="busy")
        assert over.value.status == 503 and over.value.attempts == FAST.max_attempts
        with pytest.raises(RequestRejected) as rej:
            client.generate(PROMPT, rid="bad")
    assert rej.value.status == 400 and rej.value.param == "input_ids"
    assert rej.value.message == "prompt of 9000 tokens exceeds max_model_len"
    assert [r for r, _, _ in log["calls"]].count("bad") == 1


def test_dead_server_is_skipped_and_all_dead_is_unreachable(fake):
    """With a dead URL first in the list, every sample still succeeds on the live server and
    the dead one is tried once (then marked down); all-dead raises ServerUnreachable."""
    (url, _), (log, _) = fake
    dead = f"http://127.0.0.1:{free_port()}"
    with RolloutClient([dead, url], retry=FAST, strategy="round_robin") as client:
        group = client.generate(PROMPT, n=6, rid="d")
        assert [s.rid for s in group] == [f"d-{i}" for i in range(6)]
        assert {s.server for s in group} == {url}
    with RolloutClient(dead, retry=FAST) as client, pytest.raises(ServerUnreachable) as err:
        client.generate(PROMPT)
    assert err.value.attempts == FAST.max_attempts and err.value.urls == [dead]


def test_timeout_raises_and_aborts_server_side(fake):
    """A reply slower than the timeout raises RequestTimeout (not retried by default) and
    the client sends /abort_request for that rid so the server stops generating."""
    (url, _), (log, _) = fake
    log["script"] = {"slow": ["slow"]}
    with RolloutClient(url, retry=FAST) as client, pytest.raises(RequestTimeout):
        client.generate(PROMPT, rid="slow", timeout=0.3)
    assert log["aborts"] == ["slow"] and len(log["calls"]) == 1


def test_load_spreading(fake):
    """round_robin alternates servers; least_outstanding puts concurrent samples on both."""
    urls, logs = fake
    with RolloutClient(urls, strategy="round_robin") as client:
        seq = [client.generate(PROMPT)[0].server for _ in range(4)]
    assert seq[0] != seq[1] and seq[0::2] == [seq[0]] * 2 and seq[1::2] == [seq[1]] * 2
    logs[0]["script"] = logs[1]["script"] = {f"c-{i}": ["slow"] for i in range(4)}
    with RolloutClient(urls) as client:
        group = client.generate(PROMPT, n=4, rid="c")
    assert sorted(s.server for s in group) == sorted(urls * 2)


def test_async_client_retries_and_rejects(fake):
    """The asyncio client shares the policy: 503 then a reply; 400 -> RequestRejected."""
    (url, _), (log, _) = fake
    log["script"] = {"a": ["503:0.05", "ok"], "b": ["400"]}

    async def run():
        async with AsyncRolloutClient(url, retry=FAST) as client:
            (s,) = await client.generate(PROMPT, rid="a")
            with pytest.raises(RequestRejected, match="max_model_len"):
                await client.generate(PROMPT, rid="b")
            return s

    assert asyncio.run(run()).token_ids == [1, 2, 3]


def test_version_conflict_sends_nothing(fake):
    """Integer version older than the served one -> VersionConflict before any pause or
    update reaches the server; a non-integer label never conflicts."""
    (url, _), (log, _) = fake
    log["version"] = "7"
    tensors = {"w": np.zeros(2, np.float32)}
    with WeightSync(url) as sync:
        with pytest.raises(VersionConflict):
            sync.push_tensor(tensors, weight_version=5)
        assert "admin" not in log
        log["version"] = "default"
        assert sync.push_tensor(tensors, weight_version=5) == "8"
    assert log["admin"] == ["pause_generation", "update_weights_from_tensor", "continue_generation"]


def test_retry_decisions():
    """Retry-After parsing (seconds and HTTP date), capped exponential backoff, and a fresh
    rid for a retry after a try that may have reached the server."""
    assert parse_retry_after("2") == 2.0 and parse_retry_after(None) is None
    date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 25 < parse_retry_after(date) <= 31
    p = RetryPolicy(initial_backoff_s=1, multiplier=2, max_backoff_s=5, jitter=0)
    assert [p.backoff(k) for k in (1, 2, 3, 4)] == [1, 2, 4, 5] and p.backoff(1, 9.0) == 9.0
    pool = EndpointPool(["a:1", "http://b:2/"])
    assert pool.urls == ["http://a:1", "http://b:2"]
    attempts = Attempts(p, pool)
    body = {"rid": "x"}
    attempts.next_url()
    assert ClientBase._retry_rid(body, "x", attempts) == "x"
    attempts.failed("http://a:1", httpx.ReadError("reset"))
    attempts.next_url()
    assert ClientBase._retry_rid(body, "x", attempts) == "x-retry2"
    assert pool.pick() == "http://b:2"  # a is marked down after the dropped connection


# ------------------------------------------------------------------------ real server
GREEDY = {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}


def weights(model: Path) -> dict[str, np.ndarray]:
    return safetensors.numpy.load_file(str(model / "model.safetensors"))


def test_group_on_real_server(real):
    """n=4 seeded samples: separate requests with distinct rids, full logprobs (<= 0), one
    version label per token, spec stats from MTP drafting; the same seed reproduces them."""
    client = real[0]
    params = {"temperature": 1.0, "max_new_tokens": 12, "ignore_eos": True, "sampling_seed": 11}
    group = client.generate(PROMPT, params, n=4, rid="grp")
    again = client.generate(PROMPT, params, n=4, rid="grp2")
    assert [s.token_ids for s in group] == [s.token_ids for s in again]
    assert len({tuple(s.token_ids) for s in group}) > 1  # seed + i: samples differ
    for s in group:
        assert s.num_tokens == 12 and len(s.logprobs) == 12 and max(s.logprobs) <= 0
        assert s.finish_reason == "length" and s.weight_versions == [s.weight_version] * 12
        assert s.spec_verify_ct > 0 and 0 <= s.spec_accept_rate <= 1


def test_abort_real_server(real):
    """abort(rid) on a long generation in flight ends it early with finish_reason abort."""
    client, state = real[0], real[1]

    async def run():
        async with AsyncRolloutClient(client.urls) as ac:
            task = asyncio.create_task(
                ac.generate(PROMPT, {"max_new_tokens": 400, "ignore_eos": True}, rid="long"))  # fmt: skip
            while "long" not in state.generate.active:
                await asyncio.sleep(0.01)
            assert await ac.abort("long") == 1
            return (await task)[0]

    s = asyncio.run(run())
    assert s.aborted and s.num_tokens < 400


def test_weight_sync_real_server(real):
    """Numpy state dicts over HTTP then disk: greedy output follows the pushed weights
    (m1, then back to m0), versions move to the pushed labels; an older integer version and
    an unknown tensor name are refused with nothing changed."""
    client, _, models, root = real
    greedy = lambda: client.generate(PROMPT, GREEDY)[0].token_ids  # noqa: E731
    g0 = greedy()
    with WeightSync(client, selector="target") as sync:
        assert sync.push_tensor(weights(models[1]), weight_version=1) == "1"
        g1 = greedy()
        assert g1 != g0 and client.weight_versions() == {client.urls[0]: "1"}
        assert sync.push_disk(weights(models[0]), root / "shared", weight_version=2) == "2"
        assert greedy() == g0 and not any((root / "shared").iterdir())
        with pytest.raises(VersionConflict):
            sync.push_tensor(weights(models[1]), weight_version=1)
        with pytest.raises(WeightSyncError, match="model.layers.9.bogus"):
            sync.push_tensor({"model.layers.9.bogus": np.zeros(3, np.float32)}, weight_version=3)
    assert client.weight_versions() == {client.urls[0]: "2"} and greedy() == g0
    assert client.model_info()["weight_version"] == "2"


TRAINER = r"""
import sys, json, safetensors.torch
sys.path.insert(0, sys.argv[4])
from bebop_client import WeightSync, WeightSyncError
url, port, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
sd = safetensors.torch.load_file(path)
out = {}
with WeightSync(url, selector="target") as sync:
    sync.init_group("127.0.0.1", port, backend="gloo", group_name="bebop-test")
    try:
        sync.push_distributed({"model.layers.7.nope": sd[next(iter(sd))]}, weight_version="x")
    except WeightSyncError as exc:
        out["refused"] = exc.message
    out["flat"] = sync.push_distributed(sd, weight_version="10", flattened=True, bucket_bytes=20000)
    out["plain"] = sync.push_distributed(sd, weight_version="11")
print(json.dumps(out))
"""


def test_distributed_push_real_server(real):
    """A trainer process (rank 0, gloo) forms the group SGLang's way and pushes by
    broadcast: an unknown name is refused with the server's message and the group stays
    usable; flattened multi-bucket and per-tensor pushes land (greedy == HTTP-pushed m1)."""
    client, _, models, _ = real
    with WeightSync(client, selector="target") as sync:
        sync.push_tensor(weights(models[1]), weight_version="9")
    expected = client.generate(PROMPT, GREEDY)[0].token_ids
    with WeightSync(client, selector="target") as sync:
        sync.push_tensor(weights(models[0]), weight_version="9")
    proc = subprocess.run(
        [sys.executable, "-c", TRAINER, client.urls[0], str(free_port()),
         str(models[1] / "model.safetensors"), str(REPO / "clients")],
        capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "model.layers.7.nope" in out["refused"]
    assert (out["flat"], out["plain"]) == ("10", "11")
    assert client.generate(PROMPT, GREEDY)[0].token_ids == expected


def test_metrics_real_server(real):
    """The parsed /metrics agree with themselves and the server: per-position acceptance is
    non-increasing, verified positions by entropy bucket sum to the entropy histogram's
    count, the version label is the served one; delta() of two scrapes counts one call."""
    client = real[0]
    before = client.metrics()
    client.generate(PROMPT, {"max_new_tokens": 16, "ignore_eos": True}, n=2)
    m = client.metrics()
    per = m.per_position_acceptance
    assert len(per) == 3 and all(a >= b for a, b in zip(per, per[1:], strict=False))
    assert m.draft_mode == "rs" and 0 <= m.acceptance_rate <= 1
    verified = sum(b.verified for b in m.acceptance_by_entropy)
    assert verified == m.value("spec_decode_target_entropy_count") == m.entropy_histogram[-1][1]
    assert m.weight_version_label == list(client.weight_versions().values())[0]
    window = m.delta(before)
    assert window.value("request_success", finished_reason="length") == 2
    assert window.num_drafts == m.num_drafts - before.num_drafts > 0


def test_async_rl_loop_example(real):
    """clients/examples/async_rl_loop.py runs two GRPO steps against the server: rollouts
    overlap training, and each step pushes a new integer version above the served one."""
    import importlib.util

    client, _, models, _ = real
    spec = importlib.util.spec_from_file_location(
        "rl_loop", REPO / "clients/examples/async_rl_loop.py"
    )
    loop = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loop)
    served = next(iter(client.weight_versions().values()))  # "default" on a fresh server
    before = int(served) if served.isdigit() else 0
    args = loop.args_parser().parse_args(["--steps", "2", "--prompts", "2", "--group", "2",
                                          "--max-new-tokens", "6"])  # fmt: skip
    assert asyncio.run(loop.run(client.urls[0], str(models[0]), args)) == str(before + 2)


def test_metrics_parser_matches_prometheus_client():
    """parse_metrics reads prometheus_client's own exposition (escaped label values, +Inf
    buckets, _total/_sum/_count) to the same samples its reference parser finds."""
    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    reg = CollectorRegistry()
    c = Counter("bebop:spec_decode_num_accepted_tokens_per_pos", "d", ["model_name", "position"],
                registry=reg)  # fmt: skip
    h = Histogram("bebop:spec_decode_target_entropy", "d", ["model_name"], buckets=(0.5, 2.0),
                  registry=reg)  # fmt: skip
    weird = 'a "quoted" \\ name\nline'
    c.labels(weird, "0").inc(5)
    c.labels(weird, "1").inc(2)
    for x in (0.1, 1.0, 3.0):
        h.labels(weird).observe(x)
    text = generate_latest(reg).decode()
    ours = parse_metrics(text)
    ref = [
        (s.name, s.labels, s.value) for f in text_string_to_metric_families(text) for s in f.samples
    ]
    assert sorted((s.name, sorted(s.labels.items()), s.value) for s in ours.samples) == sorted(
        (n, sorted(lb.items()), v) for n, lb, v in ref
    )
    assert ours.by_label("spec_decode_num_accepted_tokens_per_pos", "position") == {"0": 5, "1": 2}
    assert ours.entropy_histogram == [(0.5, 1.0), (2.0, 2.0), (float("inf"), 3.0)]
    assert ours.find("spec_decode_num_accepted_tokens_per_pos")[0].labels["model_name"] == weird
    assert abs(ours.mean_entropy - 4.1 / 3) < 1e-12


def test_sync_client_is_thread_safe(fake):
    """One RolloutClient shared by several threads: every call returns its own sample."""
    (url, _), _ = fake
    out: list = []
    with RolloutClient(url) as client:
        threads = [threading.Thread(target=lambda i=i: out.append(client.generate(PROMPT, rid=f"t{i}")[0].rid))
                   for i in range(8)]  # fmt: skip
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert sorted(out) == sorted(f"t{i}" for i in range(8))
