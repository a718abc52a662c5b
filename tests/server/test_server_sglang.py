"""The SGLang-native dialect (/generate and friends) with the payloads slime and AReaL send,
against a real uvicorn server (tiny random Qwen3, token-id mode: no tokenizer)."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from bebop_spec import LLM, SamplingParams
from bebop_spec.server.testing import serve_model
from bebop_spec.testing import make_tiny_model

EOS = 63  # make_tiny_model: eos = vocab_size - 1


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("sgl") / "m", vocab_size=64, seed=1)


@pytest.fixture(scope="module")
def server(model_dir):
    # Fixed γ: these tests check the spec_* counters, which the auto policy may leave at 0
    # (it can choose plain decoding from measured step costs).
    engine = {"spec_policy": "fixed"}
    with serve_model(str(model_dir), str(model_dir / "mtp"), engine=engine) as (srv, state):
        yield srv, state


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server[0].url, timeout=60) as c:
        yield c


def test_slime_payload(http, model_dir):
    """slime: input_ids + return_logprob; output_token_logprobs are [logprob, id, None]
    triples aligned with output_ids, finish_reason/weight_version as slime reads them, and
    greedy output equals the offline engine's."""
    payload = {
        "input_ids": [1, 2, 3, 4],
        "sampling_params": {"temperature": 0.0, "top_p": 1.0, "top_k": -1, "max_new_tokens": 16,
                            "stop": None, "stop_token_ids": [EOS], "skip_special_tokens": False,
                            "no_stop_trim": True, "spaces_between_special_tokens": False},
        "return_logprob": True,
    }  # fmt: skip
    out = http.post("/generate", json=payload).json()
    meta = out["meta_info"]
    lps = meta["output_token_logprobs"]
    assert [t for _, t, _ in lps] == out["output_ids"] and all(x is None for *_, x in lps)
    assert meta["completion_tokens"] == len(out["output_ids"]) and meta["prompt_tokens"] == 4
    assert meta["finish_reason"]["type"] in ("stop", "length")
    assert meta["weight_version"] == "default"
    assert meta["weight_versions"] == [
        {"version": "default", "start": 0, "end": len(out["output_ids"])}
    ]
    assert {"spec_accept_rate", "spec_accept_length", "spec_verify_ct"} <= set(meta)
    llm = LLM(str(model_dir), mtp=str(model_dir / "mtp"))
    ref = llm.generate(
        [[1, 2, 3, 4]], SamplingParams(temperature=0, max_tokens=16, stop_token_ids=[EOS])
    )
    assert out["output_ids"] == ref[0].outputs[0].token_ids


def test_areal_payload_logprobs_are_sampling_logprobs(http):
    """AReaL: explicit defaults for unsupported knobs are accepted; at temperature 1 each
    reported logprob is log p(token) of the sampling distribution (<= 0, finite). AReaL sends
    ignore_eos with EOS in stop_token_ids, so a sampled EOS still stops (as in SGLang)."""
    payload = {
        "input_ids": [5, 6, 7],
        "sampling_params": {"top_p": 1.0, "top_k": -1, "max_new_tokens": 20, "min_new_tokens": 0,
                            "temperature": 1.0, "stop_token_ids": [EOS], "ignore_eos": True,
                            "frequency_penalty": 0.0, "skip_special_tokens": True},
        "return_logprob": True,
        "stream": False,
    }  # fmt: skip
    out = http.post("/generate", json=payload).json()
    ids = out["output_ids"]
    if ids[-1] == EOS and len(ids) < 20:  # ignore_eos, but EOS is in stop_token_ids: it stops
        assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": EOS}
    else:
        assert out["meta_info"]["finish_reason"] == {"type": "length", "length": 20}
    assert all(-50 < lp <= 0 for lp, _, _ in out["meta_info"]["output_token_logprobs"])


def test_batch_and_n_shapes(http):
    """A batch answers a list ordered prompt-major / sample-minor; n > 1 on one prompt too."""
    sp = {"max_new_tokens": 3, "ignore_eos": True, "n": 2, "sampling_seed": 4}
    outs = http.post(
        "/generate", json={"input_ids": [[1, 2], [3, 4, 5]], "sampling_params": sp}
    ).json()
    assert [o["meta_info"]["prompt_tokens"] for o in outs] == [2, 2, 3, 3]
    ids = [o["meta_info"]["id"] for o in outs]
    assert len(set(ids)) == 4
    one = http.post(
        "/generate", json={"input_ids": [1, 2], "sampling_params": sp, "rid": "r1"}
    ).json()
    assert isinstance(one, list) and [o["meta_info"]["id"] for o in one] == ["r1-0", "r1-1"]
    assert one[0]["output_ids"] == outs[0]["output_ids"]  # same seed, same prompt


def test_stream_is_cumulative_and_ends_with_done(http):
    """SGLang streams cumulative output_ids; the last event before [DONE] is finished."""
    body = {"input_ids": [[1, 2, 3], [9, 8]], "stream": True,
            "sampling_params": {"max_new_tokens": 6, "ignore_eos": True}}  # fmt: skip
    events = []
    with http.stream("POST", "/generate", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
    assert events[-1] == "[DONE]"
    parsed = [json.loads(e) for e in events[:-1]]
    for idx in (0, 1):
        mine = [p for p in parsed if p["index"] == idx]
        lens = [len(p["output_ids"]) for p in mine]
        assert lens == sorted(lens) and lens[-1] == 6
        assert mine[-1]["meta_info"]["finish_reason"]["type"] == "length"


def test_abort_request_by_rid(server, http):
    """/abort_request {rid} ends that request with finish_reason abort (HTTP 200)."""
    srv, state = server

    async def run() -> dict:
        async with httpx.AsyncClient(base_url=srv.url, timeout=60) as c:
            body = {"input_ids": [1, 2, 3], "rid": "long-1",
                    "sampling_params": {"max_new_tokens": 400, "ignore_eos": True}}  # fmt: skip
            task = asyncio.create_task(c.post("/generate", json=body))
            while "long-1" not in state.generate.active:
                await asyncio.sleep(0.005)
            r = await c.post("/abort_request", json={"rid": "long-1"})
            assert r.status_code == 200
            return (await task).json()

    out = asyncio.run(run())
    assert out["meta_info"]["finish_reason"]["type"] == "abort"
    assert len(out["output_ids"]) < 400


def test_info_health_and_version(http):
    """Model/server info, weight version and health endpoints answer as SGLang's do."""
    info = http.get("/get_model_info").json()
    assert info["is_generation"] and info["weight_version"] == "default"
    assert info["draft_mode"] == "rs" and info["num_speculative_tokens"] == 3
    server_info = http.get("/get_server_info").json()
    assert "admin_token" not in server_info and server_info["internal_states"][0]["weight_version"]
    assert http.get("/get_weight_version").json()["weight_version"] == "default"
    assert http.get("/health").status_code == 200
    assert http.get("/health_generate").status_code == 200


def test_metrics_expose_spec_and_latency(http):
    """/metrics carries the DESIGN §4 spec counters, entropy buckets, gauges and latencies."""
    http.post(
        "/generate",
        json={"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 8, "ignore_eos": True}},
    )
    text = http.get("/metrics").text
    for name in (
        "bebop:spec_decode_num_drafts_total", "bebop:spec_decode_num_draft_tokens_total",
        "bebop:spec_decode_num_accepted_tokens_total",
        'bebop:spec_decode_num_accepted_tokens_per_pos_total{model_name="tiny",position="0"}',
        "bebop:spec_decode_target_entropy_bucket", "bebop:spec_decode_verified_tokens_by_entropy_total",
        'bebop:spec_decode_draft_mode_info{draft_mode="rs",model_name="tiny"} 1.0',
        "bebop:weight_version", 'bebop:weight_version_info{model_name="tiny",version="default"} 1.0',
        "bebop:num_requests_running", "bebop:num_requests_waiting", "bebop:prompt_tokens_total",
        "bebop:generation_tokens_total", "bebop:time_to_first_token_seconds_bucket",
        "bebop:inter_token_latency_seconds_bucket",
    ):  # fmt: skip
        assert name in text, name


def test_pause_in_place_holds_and_continue_resumes(server, http):
    """pause_generation(in_place) stops decoding without losing requests; continue resumes."""
    srv, state = server

    async def run() -> dict:
        async with httpx.AsyncClient(base_url=srv.url, timeout=60) as c:
            assert (await c.post("/pause_generation", json={"mode": "in_place"})).status_code == 200
            body = {
                "input_ids": [4, 5],
                "sampling_params": {"max_new_tokens": 5, "ignore_eos": True},
            }
            task = asyncio.create_task(c.post("/generate", json=body))
            await asyncio.sleep(0.3)
            assert not task.done()
            assert (await c.post("/continue_generation", json={})).status_code == 200
            return (await task).json()

    t0 = time.monotonic()
    out = asyncio.run(run())
    assert len(out["output_ids"]) == 5 and time.monotonic() - t0 >= 0.3


@pytest.mark.parametrize("mode", ["abort", "retract"])
def test_pause_abort_and_retract(server, http, mode):
    """pause(abort) ends in-flight requests with finish_reason abort; pause(retract) keeps
    them queued and, after continue, they complete all their tokens."""
    srv, state = server

    async def run() -> dict:
        async with httpx.AsyncClient(base_url=srv.url, timeout=60) as c:
            body = {"input_ids": [1, 2, 3], "rid": f"p-{mode}",
                    "sampling_params": {"max_new_tokens": 300, "ignore_eos": True}}  # fmt: skip
            task = asyncio.create_task(c.post("/generate", json=body))
            while f"p-{mode}" not in state.generate.active:
                await asyncio.sleep(0.005)
            assert (await c.post("/pause_generation", json={"mode": mode})).status_code == 200
            if mode == "retract":
                await asyncio.sleep(0.2)
                assert not task.done()
            await c.post("/continue_generation", json={})
            return (await task).json()

    out = asyncio.run(run())
    if mode == "abort":
        assert out["meta_info"]["finish_reason"]["type"] == "abort"
    else:
        assert len(out["output_ids"]) == 300
