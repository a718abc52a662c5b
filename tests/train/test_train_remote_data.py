"""`bebop mtp data --server`: self-distillation data sampled from running servers
(bebop_spec.train.remote_data, remote_client, sample_shard).

Two real uvicorn servers (server.testing.serve_model), each behind a small counting ASGI
proxy that can hold requests, on a tiny random Qwen3 with a byte-level BPE tokenizer and chat
template; its config lists 10 EOS ids so that a good share of the responses end on one.
Retry decisions use an httpx MockTransport.

Run: python -m pytest -q tests/train/test_train_remote_data.py
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from bebop_spec.cli import main as bebop
from bebop_spec.server.testing import ServerThread, serve_model
from bebop_spec.testing import make_tiny_model, make_tiny_tokenizer
from bebop_spec.train.data import read_dataset
from bebop_spec.train.remote_client import RemoteError, RetryPolicy, ServerPool
from bebop_spec.train.remote_data import (
    SHARD_FILE,
    RemoteDataConfig,
    check_tokenizer,
    generate_remote_dataset,
)
from bebop_spec.train.selfdistill import DataConfig, encode_prompt, file_prompts, generate_dataset

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[2]
EOS = list(range(100, 110))
SAMPLES, MAX_TOKENS = 2, 16


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """Random Qwen3 (hidden 32, vocab 320) with tokenizer and chat template; EOS = 10 ids."""
    m = make_tiny_model(tmp_path_factory.mktemp("rd") / "m", hidden_size=32, with_tokenizer=True,
                        mtp_layout=None, seed=5)  # fmt: skip
    cfg = json.loads((m / "config.json").read_text())
    (m / "config.json").write_text(json.dumps({**cfg, "eos_token_id": EOS}))
    return m


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    """6 chat prompts (math) and 6 token-id prompts (toy)."""
    rows = [{"messages": [{"role": "user", "content": f"What is {i} + {2 * i}?"}],
             "domain": "math"} for i in range(6)]  # fmt: skip
    rows += [{"input_ids": [5 + i, 40, 77, 9 + i], "domain": "toy"} for i in range(6)]
    path = tmp_path_factory.mktemp("rdp") / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _data(model_dir, prompts_file, out, **kw) -> DataConfig:
    return DataConfig(model=str(model_dir), out=str(out), prompts=str(prompts_file), num_prompts=12,
                      max_tokens=MAX_TOKENS, samples_per_prompt=SAMPLES, seed=1, **kw)  # fmt: skip


class GatedProxy:
    """ASGI reverse proxy to a real server: counts sampling requests and, once `hold_after`
    have passed, holds the rest until `release` is set (a run whose later requests hang, to
    be killed mid-way)."""

    PATHS = ("/v1/completions", "/generate")

    def __init__(self, upstream: str) -> None:
        self.upstream, self.seen, self.hold_after = upstream, 0, None
        self.release = threading.Event()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while (msg := await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        body, more = b"", True
        while more:
            msg = await receive()
            body, more = body + msg.get("body", b""), msg.get("more_body", False)
        if scope["path"] in self.PATHS:
            self.seen += 1
            number = self.seen
            while self.hold_after is not None and number > self.hold_after:
                if self.release.is_set():
                    break
                await asyncio.sleep(0.01)
        async with httpx.AsyncClient(base_url=self.upstream, timeout=60) as c:
            r = await c.request(scope["method"], scope["path"], content=body,
                                headers={"content-type": "application/json"})  # fmt: skip
        kind = r.headers.get("content-type", "application/json").encode()
        await send({"type": "http.response.start", "status": r.status_code,
                    "headers": [(b"content-type", kind)]})  # fmt: skip
        await send({"type": "http.response.body", "body": r.content})


@pytest.fixture(scope="module")
def servers(model_dir):
    """Two real servers on the model, no speculation, each behind a GatedProxy (open)."""
    with contextlib.ExitStack() as stack:
        ups = [stack.enter_context(serve_model(str(model_dir), engine={"draft_mode": None}))[0]
               for _ in range(2)]  # fmt: skip
        gates = [GatedProxy(u.url) for u in ups]
        urls = tuple(stack.enter_context(ServerThread(g)).url for g in gates)
        yield urls, gates


@pytest.fixture(scope="module")
def embedded(model_dir, prompts_file, tmp_path_factory):
    """The embedded path's dataset for the same prompts and settings."""
    out = tmp_path_factory.mktemp("emb") / "data"
    generate_dataset(_data(model_dir, prompts_file, out), progress=False)
    return read_dataset(out)


def _remote(model_dir, prompts_file, out, urls, **kw):
    cfg = RemoteDataConfig(_data(model_dir, prompts_file, out), servers=urls, concurrency=4, **kw)
    generate_remote_dataset(cfg, progress=False)
    return read_dataset(out)


def _same(a, b) -> bool:
    return all(torch.equal(getattr(a, k), getattr(b, k))
               for k in ("input_ids", "loss_mask", "offsets", "domain"))  # fmt: skip


@pytest.mark.parametrize("api", ["openai", "sglang"])
def test_both_apis_write_the_embedded_dataset(api, servers, embedded, model_dir, prompts_file,
                                              tmp_path):  # fmt: skip
    """Sampled on two servers (either dialect), the dataset equals the embedded path's token for
    token (same prompts, per-prompt seeds, prompt-major order), so its loss mask is the
    response, the final EOS included when the sample stopped on one; meta.json has the
    embedded provenance plus the servers (both used) and the API."""
    urls, _ = servers
    ds = _remote(model_dir, prompts_file, tmp_path / "out", urls, api=api)
    assert _same(ds, embedded) and ds.meta.domains == embedded.meta.domains == ["math", "toy"]
    assert ds.meta.model == embedded.meta.model and ds.meta.temperature == 1.0
    assert ds.meta.extra == embedded.meta.extra | {"server_api": api, "servers": sorted(urls)}
    from bebop_spec.models import load_tokenizer

    tok = load_tokenizer(model_dir)
    prompts = file_prompts(prompts_file, 12)
    finish = {"stop": 0, "length": 0}
    for s in range(len(ds)):
        ids, mask = ds.sequence(s)
        prompt = encode_prompt(tok, prompts[s // SAMPLES])
        n = len(prompt)
        assert ids[:n].tolist() == prompt and not mask[:n].any() and mask[n:].all()
        stopped = int(ids[-1]) in EOS  # the engine stops at the first EOS id and keeps it
        assert stopped or len(ids) - n == MAX_TOKENS
        assert not any(int(t) in EOS for t in ids[n:-1])
        finish["stop" if stopped else "length"] += 1
    assert finish == ds.meta.extra["finish_reasons"] and finish["stop"] and finish["length"]


def _cli_run(model_dir, prompts_file, out, urls) -> subprocess.Popen:
    argv = ["mtp", "data", "--model", str(model_dir), "--out", str(out), "--prompts",
            str(prompts_file), "--num-prompts", "12", "--max-tokens", str(MAX_TOKENS),
            "--samples-per-prompt", str(SAMPLES), "--seed", "1", "--concurrency", "2",
            "--quiet", *(a for u in urls for a in ("--server", u))]  # fmt: skip
    code = "import sys; from bebop_spec.cli import main; sys.exit(main(sys.argv[1:]))"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", code, *argv], cwd=REPO, env=env)


def _records(shard: Path) -> list[dict]:
    return [json.loads(line) for line in shard.read_text().splitlines()[1:]]


def test_killed_run_resumes_without_duplicates_or_losses(servers, embedded, model_dir,
                                                         prompts_file, tmp_path):  # fmt: skip
    """A CLI run SIGKILLed after 5 of 12 prompts, then a partial line appended to its shard (a
    kill mid-write), resumes: the partial line is dropped, only the 7 missing prompts are
    requested again, the shard holds each (prompt, sample) exactly once, and the dataset
    equals an uninterrupted run's."""
    urls, gates = servers
    out = tmp_path / "out"
    shard = out / SHARD_FILE
    gates[0].hold_after = gates[0].seen + 5  # one server: 5 requests pass, then it hangs
    gates[0].release.clear()
    proc = _cli_run(model_dir, prompts_file, out, urls[:1])
    try:
        deadline = time.monotonic() + 60
        while not (shard.is_file() and len(_records(shard)) == 5 * SAMPLES):
            assert proc.poll() is None and time.monotonic() < deadline, "the run did not get going"
            time.sleep(0.05)
        time.sleep(0.2)  # no more records can come: every other request is held
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
        gates[0].release.set()
        gates[0].hold_after = None
    done = {(r["prompt"], r["sample"]) for r in _records(shard)}
    assert len(done) == 5 * SAMPLES
    with shard.open("a") as f:
        f.write('{"prompt": 11, "sample": 0, "token_ids": [3, 1')  # killed mid-write
    before = sum(g.seen for g in gates)
    ds = _remote(model_dir, prompts_file, out, urls)
    assert sum(g.seen for g in gates) - before == 12 - 5
    keys = [(r["prompt"], r["sample"]) for r in _records(shard)]
    assert sorted(keys) == [(i, j) for i in range(12) for j in range(SAMPLES)]
    assert _same(ds, embedded)


def test_resume_refuses_a_shard_of_other_settings(servers, model_dir, prompts_file, tmp_path):
    """A shard drawn at another temperature is not mixed into a new run: a ValueError names
    the setting, and nothing is appended."""
    urls, _ = servers
    cfg = RemoteDataConfig(_data(model_dir, prompts_file, tmp_path), servers=urls)
    generate_remote_dataset(cfg, progress=False)
    lines = (tmp_path / SHARD_FILE).read_text()
    other = RemoteDataConfig(_data(model_dir, prompts_file, tmp_path, temperature=0.5),
                             servers=urls)  # fmt: skip
    with pytest.raises(ValueError, match="other settings .*temperature"):
        generate_remote_dataset(other, progress=False)
    assert (tmp_path / SHARD_FILE).read_text() == lines


# ---------------------------------------------------------------- retries (MockTransport)


def _pool(handler, urls=("http://a", "http://b"), retries=2) -> ServerPool:
    return ServerPool(list(urls), RetryPolicy(max_retries=retries, backoff_s=0.0), concurrency=2,
                      transport=httpx.MockTransport(handler))  # fmt: skip


def _post(pool: ServerPool):
    async def go():
        async with pool:
            return await pool.request("POST", "/generate", body=lambda _: {"input_ids": [1]})

    return asyncio.run(go())


def test_503_and_connection_errors_are_retried_on_the_other_server():
    """503, 429 and refused connections are retried (up to max_retries, alternating servers)
    and the eventual answer is returned once."""
    seen = []
    replies = iter([httpx.Response(503, json={"error": {"message": "overloaded"}}),
                    httpx.Response(429), "refuse", httpx.Response(200, json={"ok": 1})])  # fmt: skip

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.host)
        r = next(replies)
        if r == "refuse":
            raise httpx.ConnectError("refused", request=request)
        return r

    url, reply = _post(_pool(handler, retries=3))
    assert reply == {"ok": 1} and len(seen) == 4 and url == f"http://{seen[-1]}"
    assert all(a != b for a, b in zip(seen, seen[1:], strict=False))


def test_400_is_not_retried_and_persistent_503_gives_up():
    """A 400 fails at once with the server's message; a server that keeps answering 503
    fails after max_retries + 1 attempts with an error that says so."""
    calls = []

    def bad(request):
        calls.append(1)
        return httpx.Response(400, json={"error": {"message": "prompt is empty"}})

    with pytest.raises(RemoteError, match="HTTP 400: prompt is empty") as info:
        _post(_pool(bad))
    assert len(calls) == 1 and info.value.status == 400
    calls.clear()

    def down(request):
        calls.append(1)
        return httpx.Response(503, headers={"Retry-After": "0"})

    with pytest.raises(RemoteError, match="failed 3 times .*HTTP 503"):
        _post(_pool(down))
    assert len(calls) == 3


def test_backoff_doubles_honours_retry_after_and_is_capped():
    """Waits double from backoff_s, a longer Retry-After wins, max_backoff_s caps both."""
    p = RetryPolicy(max_retries=5, backoff_s=0.5, max_backoff_s=4.0)
    assert [p.delay(k) for k in range(5)] == [0.5, 1.0, 2.0, 4.0, 4.0]
    assert p.delay(0, retry_after=3.0) == 3.0 and p.delay(0, retry_after=60.0) == 4.0


# ---------------------------------------------------------------- tokenizer check


def test_tokenizer_mismatch_is_a_clear_error(servers, model_dir, prompts_file, tmp_path, capsys):
    """A local tokenizer that splits text differently from the server's stops the run before
    any sample is drawn (one-line CLI error, exit 1); --skip-tokenizer-check samples anyway."""
    urls, gates = servers
    other = tmp_path / "tok"
    make_tiny_tokenizer(other, vocab_size=300)  # fewer merges: other ids for the same text
    argv = ["mtp", "data", "--model", str(model_dir), "--tokenizer", str(other), "--out",
            str(tmp_path / "out"), "--prompts", str(prompts_file), "--num-prompts", "2",
            "--max-tokens", "4", "--server", urls[0], "--quiet"]  # fmt: skip
    before = gates[0].seen
    assert bebop(argv) == 1
    err = capsys.readouterr().err.strip()
    assert "tokenizer mismatch" in err and urls[0] in err and len(err.splitlines()) == 1
    assert gates[0].seen == before and not (tmp_path / "out" / SHARD_FILE).exists()
    assert bebop([*argv, "--skip-tokenizer-check"]) == 0
    assert len(read_dataset(tmp_path / "out")) == 2


def test_server_without_tokenize_route_needs_the_escape_hatch(model_dir):
    """A server with neither /tokenize nor /v1/tokenize cannot be checked: the error says to
    pass --skip-tokenizer-check."""
    from bebop_spec.models import load_tokenizer

    pool = _pool(lambda request: httpx.Response(404, json={"detail": "Not Found"}), ["http://a"])

    async def go():
        async with pool:
            await check_tokenizer(pool, "http://a", load_tokenizer(model_dir), "m")

    with pytest.raises(ValueError, match="neither /tokenize nor /v1/tokenize.*skip-tokenizer"):
        asyncio.run(go())
