"""Bad input, overload, auth and disconnects against a real uvicorn server: client mistakes
get 4xx with an OpenAI-style error body (never 500), overload gets 503 + Retry-After, admin
routes need the bearer token, and a client that goes away frees its engine request."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import httpx
import pytest

from bebop_spec.server.testing import serve_model
from bebop_spec.testing import make_tiny_model

TOKEN = "s3cret"
SLOW = threading.Event()  # while set, every engine step takes >= 200 ms
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("err") / "m", vocab_size=64, seed=2)


@pytest.fixture(scope="module")
def server(model_dir):
    """Token-protected, one running sequence and one waiting slot: easy to overload."""
    engine = {"max_num_seqs": 1, "max_waiting": 1, "max_model_len": 128}
    with serve_model(str(model_dir), str(model_dir / "mtp"), engine=engine,
                     server={"admin_token": TOKEN, "max_body_bytes": 64 * 1024}) as (srv, state):  # fmt: skip
        state.engine.add_observer(lambda _: SLOW.is_set() and time.sleep(0.2))
        yield srv, state


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server[0].url, timeout=60) as c:
        yield c


CMPL = "/v1/completions"
BAD = [
    (CMPL, b'{"model": "tiny", "prompt": [1, 2', 400),  # malformed JSON
    (CMPL, b"[1, 2, 3]", 400),  # not an object
    (CMPL, {"prompt": [1, 2], "max_tokens": "many"}, 400),
    (CMPL, {"prompt": 123}, 400),
    (CMPL, {"prompt": [1, 2], "temperature": -1}, 400),
    (CMPL, {"prompt": [1, 2], "top_p": 0}, 400),
    (CMPL, {"prompt": [1, 2], "top_k": -7}, 400),
    (CMPL, {"prompt": [1, 2], "min_p": 2}, 400),
    (CMPL, {"prompt": [1, 2], "max_tokens": 0}, 400),
    (CMPL, {"prompt": [1] * 200}, 400),  # longer than max_model_len
    (CMPL, {"prompt": [1, 2], "max_tokens": 500}, 400),  # prompt + max_tokens > context
    (CMPL, {"prompt": [1, 64]}, 400),  # outside the vocabulary
    (CMPL, {"prompt": [1, -3]}, 400),
    (CMPL, {"prompt": []}, 400),
    (CMPL, {"prompt": "text needs a tokenizer"}, 400),
    (CMPL, {"model": "other", "prompt": [1]}, 404),
    (CMPL, {"prompt": [1], "n": 1000}, 400),
    (CMPL, {"prompt": [1], "logprobs": 99}, 400),
    (CMPL, {"prompt": [1], "stop": ["x"] * 100}, 400),
    (CMPL, {"prompt": [1], "frequency_penalty": 2.5}, 400),  # outside [-2, 2]
    ("/v1/chat/completions", {"messages": []}, 400),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, 400),  # no template
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400),
    ("/generate", {"text": "a", "input_ids": [1]}, 400),
    ("/generate", {"sampling_params": {}}, 400),
    ("/generate", {"input_ids": [1], "sampling_params": {"bogus": 1}}, 400),
    ("/generate", {"input_ids": [1], "sampling_params": {"repetition_penalty": 0}}, 400),
    ("/generate", {"input_ids": [1], "sampling_params": {"max_new_tokens": -1}}, 400),
    ("/generate", {"input_ids": [1], "sampling_params": {"n": 0}}, 400),
    ("/generate", {"input_ids": [1], "sampling_params": {"temperature": "hot"}}, 400),
    ("/generate", {"input_ids": [[1, 2], []]}, 400),
    ("/generate", {"input_ids": [1.5, 2]}, 400),
    ("/generate", {"input_ids": [[1], [2]], "rid": ["a"]}, 400),
    ("/generate", {"input_ids": [1], "return_logprob": True, "logprob_start_len": 1}, 400),
    ("/generate", {"input_ids": [1] * 300}, 400),
]


@pytest.mark.parametrize(
    ("route", "body", "status"), BAD, ids=[f"{i}:{b!s:.40}" for i, (_, b, _) in enumerate(BAD)]
)
def test_bad_input_gets_openai_error(http, route, body, status):
    """Each malformed request gets the expected 4xx and an OpenAI-style error object."""
    if isinstance(body, bytes):
        r = http.post(route, content=body, headers={"content-type": "application/json"})
    else:
        r = http.post(route, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]


def test_body_too_large_is_413(http):
    """Bodies over the configured bound are refused with 413 (declared or streamed)."""
    big = b'{"prompt": [' + b"1," * 40_000 + b"1]}"
    r = http.post(CMPL, content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["type"] == "request_too_large"

    def chunks():
        yield big[: len(big) // 2]
        yield big[len(big) // 2 :]

    r = http.post(CMPL, content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert http.get("/health").status_code == 200  # still alive


def test_admin_routes_need_token(http):
    """Admin routes answer 401 without (or with a wrong) bearer token, and work with it;
    generation and aborting one's own rid stay open."""
    admin = [
        ("/update_weights_from_disk", {"model_path": "/nonexistent"}),
        ("/init_weights_update_group", {"master_address": "127.0.0.1", "master_port": 1, "rank_offset": 1, "world_size": 2}),
        ("/update_weights_from_distributed", {"names": [], "dtypes": [], "shapes": []}),
        ("/destroy_weights_update_group", {}),
        ("/pause_generation", {}),
        ("/continue_generation", {}),
        ("/flush_cache", {}),
        ("/abort_request", {"abort_all": True}),
    ]  # fmt: skip
    for route, body in admin:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            r = http.post(route, json=body, headers=headers)
            assert r.status_code == 401, (route, r.text)
    r = http.post(
        "/update_weights_from_tensor",
        content=b"xx",
        headers={"content-type": "application/octet-stream"},
    )
    assert r.status_code == 401
    assert http.post("/flush_cache", headers=AUTH).status_code == 200
    assert http.post("/abort_request", json={"abort_all": True}, headers=AUTH).status_code == 200
    assert http.post("/abort_request", json={"rid": "whatever"}).status_code == 200
    assert (
        http.post(
            "/generate", json={"input_ids": [1], "sampling_params": {"max_new_tokens": 1}}
        ).status_code
        == 200
    )


def test_overload_is_503_with_retry_after(server, http):
    """With decoding paused and the one waiting slot taken, the next request gets 503 +
    Retry-After; after continue_generation the queued request completes normally."""
    srv, state = server
    assert (
        http.post("/pause_generation", json={"mode": "in_place"}, headers=AUTH).status_code == 200
    )

    async def run():
        async with httpx.AsyncClient(base_url=srv.url, timeout=60) as c:
            body = {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 2}}
            first = asyncio.create_task(c.post("/generate", json=body))
            while state.engine.num_waiting < 1:
                await asyncio.sleep(0.01)
            second = await c.post("/generate", json=body)
            third = await c.post(CMPL, json={"prompt": [1, 2], "max_tokens": 2})
            await c.post("/continue_generation", json={}, headers=AUTH)
            return await first, second, third

    first, second, third = asyncio.run(run())
    for r in (second, third):
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["type"] == "overloaded_error"
    assert first.status_code == 200 and len(first.json()["output_ids"]) == 2


def _wait_idle(state, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while state.engine.num_running + state.engine.num_waiting > 0 or state.generate.active:
        assert time.monotonic() < deadline, "request not freed after disconnect"
        time.sleep(0.02)


@pytest.mark.parametrize("case", ["generate", "completions", "nonstream", "before-first-token"])
def test_client_disconnect_frees_request(server, http, case):
    """A client that goes away (mid-stream, before its first token, or while waiting on a
    non-streamed reply) gets its engine request aborted even while decoding is paused, so
    no slot leaks. (Engine steps are slowed to >= 200 ms: 120 tokens need >= 30 steps = 6 s.)"""
    srv, state = server
    body = {
        "input_ids": [1, 2, 3],
        "stream": True,
        "sampling_params": {"max_new_tokens": 120, "ignore_eos": True},
    }
    route = "/generate"
    if case == "completions":
        route, body = (
            CMPL,
            {"prompt": [1, 2, 3], "stream": True, "max_tokens": 120, "ignore_eos": True},
        )
    SLOW.set()
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            if case in ("nonstream", "before-first-token"):
                http.post("/pause_generation", json={"mode": "in_place"}, headers=AUTH)
                with pytest.raises(httpx.ReadTimeout):
                    c.post(route, json=body | {"stream": case != "nonstream"}, timeout=0.5)
            else:
                with c.stream("POST", route, json=body) as r:
                    assert r.status_code == 200
                    lines = (
                        r.iter_lines()
                    )  # keep a reference: a collected iterator closes the stream
                    assert next(x for x in lines if x.startswith("data: {"))
                    http.post("/pause_generation", json={"mode": "in_place"}, headers=AUTH)
                    assert state.engine.num_running == 1
        _wait_idle(state)
    finally:
        SLOW.clear()
        http.post("/continue_generation", json={}, headers=AUTH)


class _Errors(logging.Handler):
    """Collects ERROR records (and worse) from every logger it is attached to."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.mark.parametrize("route", ["/generate", CMPL])
def test_hang_up_on_nonstreamed_request_logs_no_error(server, http, route):
    """A client that hangs up while waiting on a non-streamed reply (as bench clients and
    trainers do on timeout) is a normal event: its request is aborted and freed, nothing
    is logged at ERROR (no traceback), and it is counted as request_failure code 499."""
    srv, state = server
    body = {"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 120, "ignore_eos": True}}
    if route == CMPL:
        body = {"prompt": [1, 2, 3], "max_tokens": 120, "ignore_eos": True}
    handler = _Errors()
    loggers = [logging.getLogger(n) for n in ("", "uvicorn", "uvicorn.error", "bebop")]
    for lg in loggers:
        lg.addHandler(handler)
    SLOW.set()
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as c, pytest.raises(httpx.ReadTimeout):
            c.post(route, json=body, timeout=0.6)
        _wait_idle(state)
        time.sleep(0.3)  # let the server finish handling the disconnect
    finally:
        SLOW.clear()
        for lg in loggers:
            lg.removeHandler(handler)
    assert not handler.records, [r.getMessage() for r in handler.records]
    assert 'code="499"' in http.get("/metrics").text
