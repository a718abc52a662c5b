"""Logprobs are always valid JSON (issue 15, point 1), replaying the payloads the external
clients sent: at temperature 0 (or a small top_k / top_p) the alternatives have probability
0, so their logprob is −∞; every route writes it as −9999.0, as vLLM does, streamed or not.
A request whose reply fails is counted as an error in /metrics, not as a success.

Server: tiny random Qwen3 with a byte-level BPE tokenizer and chat template, no speculation
(`--draft-mode none`, as in the issue's runs)."""

from __future__ import annotations

import json
import math

import httpx
import pytest

from bebop_spec.server.serving.common import LOGPROB_FLOOR, json_logprob
from bebop_spec.server.testing import serve_model


@pytest.fixture(scope="module")
def server(tiny_text_model):
    engine = {"draft_mode": None, "max_model_len": 128}
    with serve_model(str(tiny_text_model), engine=engine) as (srv, state):
        yield srv, state


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server[0].url, timeout=60) as c:
        yield c


def _strict(text: str):
    """Parse as strict JSON: NaN / Infinity (which Python's json accepts) are errors."""

    def refuse(name: str):
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


def _events(http: httpx.Client, route: str, body: dict) -> list:
    with http.stream("POST", route, json=body) as r:
        assert r.status_code == 200, r.read()
        lines = [x[6:] for x in r.iter_lines() if x.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    events = [_strict(x) for x in lines[:-1]]
    assert not any("error" in e for e in events), events
    return events


def _floats(obj) -> list[float]:
    if isinstance(obj, float):
        return [obj]
    if isinstance(obj, dict):
        return [f for v in obj.values() for f in _floats(v)]
    if isinstance(obj, list):
        return [f for v in obj for f in _floats(v)]
    return []


def test_json_logprob_rule():
    """−∞ and NaN become the floor −9999.0 (vLLM's spelling); finite values pass unchanged."""
    assert json_logprob(-math.inf) == LOGPROB_FLOOR == -9999.0
    assert json_logprob(math.nan) == LOGPROB_FLOOR
    assert json_logprob(-1e6) == LOGPROB_FLOOR and json_logprob(-0.5) == -0.5


COMPLETION = {"model": "tiny", "prompt": "Hello world", "max_tokens": 6, "temperature": 0,
              "logprobs": 3}  # fmt: skip
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6,
        "temperature": 0, "logprobs": True, "top_logprobs": 2}  # fmt: skip
GENERATE = {"text": "Hello world", "return_logprob": True, "top_logprobs_num": 2,
            "sampling_params": {"temperature": 0, "max_new_tokens": 6}}  # fmt: skip


def test_completions_greedy_top_logprobs(http):
    """lm-eval / openai client: /v1/completions temperature=0, logprobs=3 -> 200; the chosen
    token has logprob 0.0 and each zero-probability alternative −9999.0."""
    r = http.post("/v1/completions", json=COMPLETION)
    assert r.status_code == 200, r.text
    lp = _strict(r.text)["choices"][0]["logprobs"]
    assert lp["token_logprobs"] and all(x == 0.0 for x in lp["token_logprobs"])
    for top in lp["top_logprobs"]:
        assert len(top) >= 1 and sorted(top.values())[0] == -9999.0
    events = _events(http, "/v1/completions", COMPLETION | {"stream": True})
    tops = [t for e in events for c in e["choices"] for t in c["logprobs"]["top_logprobs"]]
    assert tops and all(-9999.0 in t.values() for t in tops)


def test_chat_greedy_top_logprobs(http):
    """Chat temperature=0, top_logprobs=2 -> 200, streamed or not; alternatives −9999.0,
    never null."""
    r = http.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 200, r.text
    content = _strict(r.text)["choices"][0]["logprobs"]["content"]
    assert content and all(t["logprob"] == 0.0 for t in content)
    assert all([a["logprob"] for a in t["top_logprobs"]][-1] == -9999.0 for t in content)
    events = _events(http, "/v1/chat/completions", CHAT | {"stream": True})
    streamed = [t for e in events for c in e["choices"] if c.get("logprobs")
                for t in c["logprobs"]["content"]]  # fmt: skip
    assert len(streamed) == len(content)
    assert all(isinstance(a["logprob"], float) for t in streamed for a in t["top_logprobs"])


def test_generate_greedy_top_logprobs(http):
    """SGLang /generate top_logprobs_num=2 at T=0 -> 200, streamed or not: every
    output_top_logprobs entry is [logprob, id, text] with a float logprob."""
    r = http.post("/generate", json=GENERATE)
    assert r.status_code == 200, r.text
    top = _strict(r.text)["meta_info"]["output_top_logprobs"]
    assert len(top) == 6 and all(len(step) == 2 and step[1][0] == -9999.0 for step in top)
    events = _events(http, "/generate", GENERATE | {"stream": True})
    assert events[-1]["meta_info"]["output_top_logprobs"] == top


@pytest.mark.parametrize("extra", [{"temperature": 1.0, "top_k": 1}, {"temperature": 1.0,
                                   "top_p": 0.01}], ids=["top_k_1", "top_p_0.01"])  # fmt: skip
def test_truncated_sampling_top_logprobs(http, extra):
    """top_k / top_p cut alternatives to probability 0 at temperature 1 too: still valid
    JSON, every float finite and >= −9999."""
    for route, body in (
        ("/v1/completions", COMPLETION | extra),
        ("/v1/chat/completions", CHAT | extra),
    ):
        r = http.post(route, json=body)
        assert r.status_code == 200, r.text
        assert all(-9999.0 <= f <= 0.0 for f in _floats(_strict(r.text)["choices"][0]["logprobs"]))
    sp = GENERATE["sampling_params"] | extra
    r = http.post("/generate", json=GENERATE | {"sampling_params": sp})
    assert r.status_code == 200, r.text
    meta = _strict(r.text)["meta_info"]
    assert all(-9999.0 <= f <= 0.0 for f in _floats(meta["output_top_logprobs"]))


def _counter(http: httpx.Client, name: str, **labels: str) -> float:
    """Sum of the samples of `bebop:{name}_total` whose labels include `labels`."""
    total = 0.0
    for line in http.get("/metrics").text.splitlines():
        if line.startswith(f"bebop:{name}_total{{"):
            series, value = line.rsplit(" ", 1)
            if all(f'{k}="{v}"' in series for k, v in labels.items()):
                total += float(value)
    return total


@pytest.mark.parametrize("route", ["/generate", "/v1/completions"])
def test_failed_reply_counts_as_failure_not_success(http, route, monkeypatch):
    """A reply that cannot be built (here: the formatter raises) is a handled 500 on the
    same keep-alive connection (the next request on it succeeds), counted as
    request_failure{stage=generation, code=500} and not as a success; streamed, the error
    comes in-band as SGLang writes it (`data: {"error": {"message": ...}}`, then [DONE])."""
    from bebop_spec.server.serving.generate_format import GenerateFormatter
    from bebop_spec.server.serving.openai_format import ChoiceFormatter

    def boom(*args, **kwargs):
        raise ValueError("formatter failed")

    body = GENERATE if route == "/generate" else COMPLETION
    monkeypatch.setattr(GenerateFormatter, "outputs", boom)
    monkeypatch.setattr(ChoiceFormatter, "full_response", boom)
    monkeypatch.setattr(ChoiceFormatter, "delta_chunks", boom)
    ok0 = _counter(http, "request_success")
    bad0 = _counter(http, "request_failure", stage="generation", code="500")
    r = http.post(route, json=body)
    assert r.status_code == 500 and "error" in r.json()
    with http.stream("POST", route, json=body | {"stream": True}) as s:
        lines = [x[6:] for x in s.iter_lines() if x.startswith("data: ")]
    assert lines[-1] == "[DONE]" and "formatter failed" in _strict(lines[-2])["error"]["message"]
    assert _counter(http, "request_failure", stage="generation", code="500") == bad0 + 2
    assert _counter(http, "request_success") == ok0
    monkeypatch.undo()
    assert http.post(route, json=body).status_code == 200  # same connection, still usable
    assert _counter(http, "request_success") == ok0 + 1


def test_refused_request_counts_as_input_failure(http):
    """A 400 before generation — from the serving layer or from body validation — is
    request_failure{stage=input_processing, code=400}."""
    before = _counter(http, "request_failure", stage="input_processing", code="400")
    bad = COMPLETION | {"prompt": [10**6]}
    assert http.post("/v1/completions", json=bad).status_code == 400
    assert http.post("/generate", json={"input_ids": [10**6]}).status_code == 400
    assert http.post("/v1/completions", json={"prompt": 5}).status_code == 400  # body invalid
    assert _counter(http, "request_failure", stage="input_processing", code="400") == before + 3


def test_eos_stop_has_null_stop_reason(http, server):
    """OpenAI routes spell an EOS stop as vLLM documents it: finish_reason "stop" with
    stop_reason null (the engine records the EOS id internally); a stop_token_ids hit keeps
    its id. The greedy first token is made an EOS id for this test."""
    engine = server[1].engine
    body = {"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 4, "temperature": 0}
    first = http.post("/v1/completions", json=body).json()["choices"][0]
    tok = http.post("/v1/completions", json=body | {"return_token_ids": True}).json()
    t = tok["choices"][0]["token_ids"][0]
    eos_ids, mc_eos = engine.engine.eos_ids, engine.model_config.eos_token_ids
    added = t not in eos_ids
    eos_ids.add(t)
    mc_eos.append(t)
    try:
        for route, b in (("/v1/completions", body),
                         ("/v1/chat/completions", CHAT | {"logprobs": False, "top_logprobs": None})):  # fmt: skip
            r = http.post(route, json=b)
            choice = r.json()["choices"][0]
            if route == "/v1/completions":
                assert (
                    choice["finish_reason"] == "stop"
                    and r.json()["usage"]["completion_tokens"] == 1
                )
            if choice["finish_reason"] == "stop":
                assert "stop_reason" in choice and choice["stop_reason"] is None, choice
    finally:
        mc_eos.remove(t)
        if added:
            eos_ids.discard(t)
    other = http.post("/v1/completions", json=body | {"stop_token_ids": [t]}).json()
    assert other["choices"][0]["stop_reason"] == t and first["finish_reason"] == "length"
    assert first["stop_reason"] is None  # length: null too, present
    events = _events(http, "/v1/completions", body | {"stream": True})
    assert events[-1]["choices"][0]["stop_reason"] is None
