"""Routes RL frameworks call that used to answer 404 (issue 15, point 4), with the request
and response shapes of the pinned engines: vLLM's RL control API (/pause?mode=abort|wait|keep,
/resume, /is_paused, /get_world_size, /reset_prefix_cache), /tokenize, /detokenize,
/tokenizer_info, and SGLang's /v1/loads and memory-occupation routes; plus the info fixes
(architectures from config.json, no γ reported without speculation).

Server: tiny random Qwen3 with a tokenizer and chat template, `--draft-mode none`."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from bebop_spec.server.testing import serve_model

LONG = {"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 200, "ignore_eos": True}}


@pytest.fixture(scope="module")
def server(tiny_text_model):
    engine = {"draft_mode": None, "max_model_len": 256}
    with serve_model(str(tiny_text_model), engine=engine) as (srv, state):
        yield srv, state


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server[0].url, timeout=60) as c:
        yield c


def _run(server, scenario):
    """Run `scenario(client, state)` on an async client against the server."""
    srv, state = server

    async def main():
        async with httpx.AsyncClient(base_url=srv.url, timeout=60) as c:
            return await scenario(c, state)

    return asyncio.run(main())


async def _until_running(state, rid: str) -> None:
    while rid not in state.generate.active or state.engine.num_running == 0:
        await asyncio.sleep(0.005)


def test_vllm_pause_abort_resume(server, http):
    """POST /pause (default mode abort, as SkyRL / TRL send it) -> {"status": "paused"}; the
    in-flight request ends with finish_reason abort; /is_paused says so; /resume ->
    {"status": "resumed"} and generation works again."""

    async def scenario(c, state):
        task = asyncio.create_task(c.post("/generate", json=LONG | {"rid": "ab"}))
        await _until_running(state, "ab")
        r = await c.post("/pause")
        assert r.status_code == 200 and r.json() == {"status": "paused"}
        assert (await c.get("/is_paused")).json() == {"is_paused": True}
        out = (await task).json()
        r = await c.post("/resume")
        assert r.json() == {"status": "resumed"}
        assert (await c.get("/is_paused")).json() == {"is_paused": False}
        return out

    out = _run(server, scenario)
    assert out["meta_info"]["finish_reason"]["type"] == "abort"
    short = {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 3, "ignore_eos": True}}
    assert len(http.post("/generate", json=short).json()["output_ids"]) == 3


def test_vllm_pause_keep_freezes_and_resumes(server):
    """mode=keep freezes the in-flight request where it is (no tokens for 0.3 s) and it
    completes all its tokens after /resume."""

    async def scenario(c, state):
        task = asyncio.create_task(c.post("/generate", json=LONG | {"rid": "kp"}))
        await _until_running(state, "kp")
        assert (await c.post("/pause?mode=keep")).status_code == 200
        await asyncio.sleep(0.3)
        assert not task.done()
        await c.post("/resume")
        return (await task).json()

    out = _run(server, scenario)
    assert len(out["output_ids"]) == 200 and out["meta_info"]["finish_reason"]["type"] == "length"


def test_vllm_pause_wait_drains_then_holds_new_requests(server):
    """mode=wait returns once the in-flight request has finished all its tokens; a request
    sent while paused waits in the server and runs only after /resume."""

    async def scenario(c, state):
        first = asyncio.create_task(c.post("/generate", json=LONG | {"rid": "wt"}))
        await _until_running(state, "wt")
        assert (await c.post("/pause?mode=wait&clear_cache=true")).json() == {"status": "paused"}
        assert first.done() and len(first.result().json()["output_ids"]) == 200
        late = asyncio.create_task(c.post("/v1/completions", json={"prompt": [4, 5],
                                          "max_tokens": 3, "ignore_eos": True}))  # fmt: skip
        await asyncio.sleep(0.3)
        assert not late.done() and (await c.get("/is_paused")).json()["is_paused"]
        await c.post("/resume")
        return (await late).json()

    assert _run(server, scenario)["usage"]["completion_tokens"] == 3


def test_vllm_pause_bad_mode_is_400(http):
    """An unknown /pause mode (mode=sleep) is a 400 and leaves the server unpaused."""
    assert http.post("/pause?mode=sleep").status_code == 400
    assert not http.get("/is_paused").json()["is_paused"]


def test_world_size_and_reset_prefix_cache(http):
    """/get_world_size -> {"world_size": 1} (one process); /reset_prefix_cache -> 200."""
    assert http.get("/get_world_size").json() == {"world_size": 1}
    assert http.get("/get_world_size?include_dp=false").json() == {"world_size": 1}
    r = http.post("/reset_prefix_cache")
    assert r.status_code == 200 and r.content == b""


def test_tokenize_detokenize_vllm_shapes(http, server):
    """/tokenize (completion and chat forms) -> {count, max_model_len, tokens, token_strs};
    the chat form gives the same ids a chat completion prefills; /detokenize inverts it;
    an id outside the vocabulary is a 400."""
    tok = server[1].engine.tokenizer
    r = http.post("/tokenize", json={"prompt": "Hello world", "return_token_strs": True}).json()
    assert r["tokens"] == tok.encode("Hello world") and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == 256 and r["token_strs"] == tok.convert_ids_to_tokens(r["tokens"])
    msgs = [{"role": "user", "content": "Hi"}]
    chat = http.post("/tokenize", json={"model": "tiny", "messages": msgs}).json()
    ref = http.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 1,
                    "return_token_ids": True}).json()["prompt_token_ids"]  # fmt: skip
    assert chat["tokens"] == ref and chat["token_strs"] is None
    back = http.post("/detokenize", json={"tokens": r["tokens"]}).json()
    assert back == {"prompt": tok.decode(r["tokens"])}
    assert http.post("/detokenize", json={"tokens": [10**6]}).status_code == 400
    assert http.post("/tokenize", json={"model": "nope", "prompt": "x"}).status_code == 404


def test_tokenizer_info(http):
    """vLLM's /tokenizer_info (lm-eval probes it): the tokenizer class, its special tokens
    and the chat template."""
    info = http.get("/tokenizer_info").json()
    assert info["tokenizer_class"] and info["chat_template"] and "eos_token" in info
    assert info["model_max_length"] == 256


def test_v1_loads(server):
    """SGLang's /v1/loads (slime polls it): one dp rank whose running count sees an
    in-flight request, and the aggregate."""

    async def scenario(c, state):
        task = asyncio.create_task(c.post("/generate", json=LONG | {"rid": "ld"}))
        await _until_running(state, "ld")
        busy = (await c.get("/v1/loads")).json()
        await c.post("/abort_request", json={"rid": "ld"})
        await task
        return busy

    busy = _run(server, scenario)
    assert busy["dp_rank_count"] == 1 and busy["loads"][0]["dp_rank"] == 0
    assert busy["loads"][0]["num_running_reqs"] == 1 == busy["aggregate"]["total_running_reqs"]
    assert {"timestamp", "version"} <= set(busy)


def test_memory_occupation_release_and_resume(server):
    """verl / AReaL: /release_memory_occupation (with SGLang's tags) stops decoding,
    re-queues the running request (not lost) and frees the KV pool (its tensors hold no
    memory; the reply says how much was freed); /resume_memory_occupation continues it to
    its full length, the pool allocated again."""

    async def scenario(c, state):
        task = asyncio.create_task(c.post("/generate", json=LONG | {"rid": "mem"}))
        await _until_running(state, "mem")
        r = await c.post("/release_memory_occupation", json={"tags": ["kv_cache", "weights"]})
        assert r.status_code == 200 and r.json()["success"] and "MiB freed" in r.json()["message"]
        await asyncio.sleep(0.2)
        assert not task.done() and state.engine.num_running == 0
        assert state.engine.engine.runner.cache.nbytes == 0
        assert (await c.post("/resume_memory_occupation", json={"tags": ["weights"]})).json()[
            "success"
        ]
        return (await task).json()

    assert len(_run(server, scenario)["output_ids"]) == 200
    assert not server[1].engine.engine.runner.kv_released


def test_info_without_speculation(http):
    """--draft-mode none: /get_server_info and /get_model_info report no γ (null, not the
    unused default 3); architectures come from config.json."""
    info = http.get("/get_server_info").json()
    assert info["num_speculative_tokens"] is None and info["draft_mode"] == "none"
    model = http.get("/get_model_info").json()
    assert model["num_speculative_tokens"] is None
    assert model["architectures"] == ["Qwen3ForCausalLM"]


def test_verl_http_server_adapter_calls(http):
    """verl's HttpServerAdapter (sglang_rollout/http_server_engine.py), its exact bodies
    and methods, no auth header: release_memory_occupation {"tags": null}, resume with
    ["weights"] then ["kv_cache"], GET /flush_cache, generate with return_logprob,
    abort_request {"rid": "", "abort_all": true} — each 200 with a JSON body."""
    calls = [
        ("POST", "/release_memory_occupation", {"tags": None}),
        ("POST", "/resume_memory_occupation", {"tags": ["weights"]}),
        ("POST", "/resume_memory_occupation", {"tags": ["kv_cache"]}),
        ("GET", "/flush_cache", None),
        ("POST", "/generate", {"input_ids": [1, 2, 3], "return_logprob": True,
                               "sampling_params": {"temperature": 1.0, "max_new_tokens": 4}}),
        ("POST", "/abort_request", {"rid": "", "abort_all": True}),
    ]  # fmt: skip
    for method, path, body in calls:
        r = http.request(method, path, json=body) if body is not None else http.get(path)
        assert r.status_code == 200, (path, r.text)
    assert not http.get("/is_paused").json()["is_paused"]


def test_inference_v1_generate_tokens_in_tokens_out(http):
    """vLLM's /inference/v1/generate as SkyRL's RemoteInferenceClient and vLLM's own tests
    call it ({model, token_ids, sampling_params: {max_tokens, temperature, ignore_eos,
    logprobs, detokenize}, stream}): choices[0].token_ids, logprobs.content[].logprob
    ("token_id:N" tokens), finish_reason, usage; greedy output equals /generate's; the
    streamed deltas concatenate to the same ids; prompt_logprobs is refused with 400."""
    body = {"model": "tiny", "token_ids": [1, 2, 3], "stream": False,
            "sampling_params": {"max_tokens": 5, "temperature": 0, "ignore_eos": True,
                                "logprobs": 1, "detokenize": False}}  # fmt: skip
    r = http.post("/inference/v1/generate", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    choice = out["choices"][0]
    ref = http.post("/generate", json={"input_ids": [1, 2, 3], "sampling_params": {
        "max_new_tokens": 5, "temperature": 0, "ignore_eos": True}}).json()  # fmt: skip
    assert choice["token_ids"] == ref["output_ids"] and choice["finish_reason"] == "length"
    content = choice["logprobs"]["content"]
    assert [c["token"] for c in content] == [f"token_id:{t}" for t in choice["token_ids"]]
    assert all(c["logprob"] == 0.0 and c["top_logprobs"] for c in content)
    assert out["usage"] == {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}
    assert "text" not in choice and out["request_id"]
    with http.stream("POST", "/inference/v1/generate", json=body | {"stream": True}) as s:
        lines = [x[6:] for x in s.iter_lines() if x.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    events = [json.loads(x) for x in lines[:-1]]
    assert [t for e in events for c in e["choices"] for t in c["token_ids"]] == choice["token_ids"]
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    bad = body | {"sampling_params": body["sampling_params"] | {"prompt_logprobs": 1}}
    assert http.post("/inference/v1/generate", json=bad).status_code == 400
