"""Hostile input, generated: the HTTP API fuzzed from its own OpenAPI schema (schemathesis),
and the safetensors parser that every network weight update goes through (hypothesis).

Invariants: no fuzzed request gets a 5xx or runs past its time budget; admin routes answer
401 to every unauthenticated request whatever its body; afterwards the server is healthy,
nothing is left running or waiting, and the weights (version and greedy output) are the
ones it started with. Numbers: >= 1,000 requests (positive and negative cases of every
operation, derandomized so a run is repeatable), 10 s budget per request. A property test
(hypothesis, 60 examples) draws valid sampling x logprob options for the three generation
routes, streamed or not: each answers 200 with strict JSON logprobs in [−9999, 0].

Run: python -m pytest -q tests/server/test_reliability_fuzz.py
"""

from __future__ import annotations

import contextlib
import json
import time

import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable

from bebop_spec.errors import WeightUpdateError
from bebop_spec.server.testing import serve_model
from bebop_spec.server.weight_sync.tensors import load_safetensors_bytes

schemathesis = pytest.importorskip("schemathesis")

TOKEN = "fuzz-token"
BUDGET_S = 10.0  # per request: a hang is a failure, not a slow test
GREEDY = {"input_ids": [1, 2, 3], "sampling_params": {"temperature": 0, "max_new_tokens": 8}}
# Admin routes fuzzed *with* the token: only those whose worst case is a refused update.
# pause/continue/flush/init_group would change the server's state for the next case (a
# paused engine makes every later generate wait), so they are fuzzed without a token only.
AUTHED_FUZZ = {"/update_weights_from_disk", "/update_weights_from_distributed",
               "/update_weights_from_tensor", "/destroy_weights_update_group",
               "/begin_weight_update", "/end_weight_update"}  # fmt: skip
EXAMPLES = 40  # per (operation, mode, auth): 27 operations -> ~1,600 requests


@pytest.fixture(scope="module")
def server(tiny_text_model, tmp_path_factory):
    """Small bounds so any fuzzed generation is cheap: 64-token context, n <= 4."""
    engine = {"max_model_len": 64, "max_num_seqs": 16}
    cfg = {"admin_token": TOKEN, "max_n": 4, "max_batch": 8, "max_body_bytes": 256 * 1024,
           "weights_root": str(tmp_path_factory.mktemp("weights_root")), "group_timeout_s": 5.0}  # fmt: skip
    with serve_model(str(tiny_text_model), str(tiny_text_model / "mtp"), engine=engine,
                     server=cfg) as (srv, state):  # fmt: skip
        yield srv, state


ADMIN = AUTHED_FUZZ | {"/init_weights_update_group", "/pause_generation",
                       "/continue_generation", "/flush_cache", "/pause", "/resume",
                       "/reset_prefix_cache", "/release_memory_occupation",
                       "/resume_memory_occupation"}  # fmt: skip


def _fuzz(op, mode, url: str, headers: dict, admin_401: bool, log: dict) -> None:
    """Run EXAMPLES cases of one operation; record 5xx, hangs and auth holes in `log`."""

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck), phases=["explicit", "generate"])  # fmt: skip
    @given(case=op.as_strategy(generation_mode=mode))
    def run(case) -> None:
        t0 = time.perf_counter()
        try:
            r = case.call(base_url=url, headers=headers, timeout=BUDGET_S)
        except Exception as exc:  # timeouts, resets: the server must answer every request
            log["errors"].append(f"{op.method} {op.path}: {type(exc).__name__}: {exc}")
            return
        log["n"] += 1
        log["slowest"] = max(log["slowest"], time.perf_counter() - t0)
        log["codes"][r.status_code] = log["codes"].get(r.status_code, 0) + 1
        if r.status_code >= 500:
            log["errors"].append(
                f"{op.method} {op.path} {case.body!r:.300} -> {r.status_code} {r.text[:300]}"
            )
        if admin_401 and r.status_code != 401:
            log["errors"].append(f"{op.method} {op.path} without token -> {r.status_code}")

    try:
        run()
    except Unsatisfiable:  # no negative case exists (e.g. a GET without parameters)
        log["unsatisfiable"] += 1


def test_fuzz_openapi_no_5xx_no_hang(server):
    """Every operation in /openapi.json, positive and negative cases, public routes with no
    token, admin routes without the token (must be 401) and the update routes with it:
    >= 1,000 requests, zero 5xx, zero hangs; the server is healthy and unchanged after."""
    import httpx

    srv, state = server
    app_schema = httpx.get(f"{srv.url}/openapi.json", timeout=30).json()
    schema = schemathesis.openapi.from_dict(app_schema)
    with httpx.Client(base_url=srv.url, timeout=60) as http:
        before = http.post("/generate", json=GREEDY).json()["output_ids"]
        version = http.get("/get_weight_version").json()["weight_version"]
    log: dict = {"n": 0, "errors": [], "codes": {}, "slowest": 0.0, "unsatisfiable": 0}
    auth = {"Authorization": f"Bearer {TOKEN}"}
    t0 = time.perf_counter()
    for result in schema.get_all_operations():
        op = result.ok()
        for mode in schemathesis.GenerationMode:
            if op.path in ADMIN:
                _fuzz(op, mode, srv.url, {}, True, log)
                if op.path in AUTHED_FUZZ:
                    _fuzz(op, mode, srv.url, auth, False, log)
            else:
                _fuzz(op, mode, srv.url, {}, False, log)
    elapsed = time.perf_counter() - t0
    print(f"\nfuzz: {log['n']} requests in {elapsed:.1f} s, slowest {log['slowest']:.2f} s, "
          f"status codes {dict(sorted(log['codes'].items()))}")  # fmt: skip
    assert not log["errors"], "\n".join(log["errors"][:20])
    assert log["n"] >= 1000
    _assert_healthy_and_unchanged(srv.url, state, before, version)


def _assert_healthy_and_unchanged(url: str, state, before: list[int], version: str) -> None:
    import httpx

    with httpx.Client(base_url=url, timeout=60) as http:
        deadline = time.monotonic() + 30
        while state.engine.num_running + state.engine.num_waiting or state.generate.active:
            assert time.monotonic() < deadline, "requests left in the engine after the fuzz"
            time.sleep(0.05)
        assert http.get("/health").status_code == 200
        assert not state.engine.paused
        assert http.get("/get_weight_version").json()["weight_version"] == version
        assert http.post("/generate", json=GREEDY).json()["output_ids"] == before
        assert state.engine.engine.blocks.num_free == state.engine.engine.blocks.num_blocks


# ---------------------------------------------------------------- safetensors parser
def _valid_file() -> bytes:
    return safetensors.torch.save({"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(4)})


@settings(max_examples=400, deadline=None, derandomize=True, database=None)
@given(data=st.binary(max_size=512))
def test_safetensors_parser_random_bytes(data):
    """Arbitrary bytes (400 derandomized examples, <= 512 B) either decode or raise
    WeightUpdateError — never another exception, never a crash or an unbounded allocation."""
    with contextlib.suppress(WeightUpdateError):
        load_safetensors_bytes(bytearray(data))


@settings(max_examples=400, deadline=None, derandomize=True, database=None)
@given(pos=st.integers(0, 10_000), value=st.integers(0, 255), cut=st.integers(0, 10_000))
def test_safetensors_parser_mutated_file(pos, value, cut):
    """A valid file with one byte changed and/or truncated (400 examples): the parser
    returns tensors that lie inside the buffer, or raises WeightUpdateError."""
    buf = bytearray(_valid_file())
    buf[pos % len(buf)] = value
    buf = buf[: max(0, len(buf) - cut % 64)]
    try:
        out = load_safetensors_bytes(buf)
    except WeightUpdateError:
        return
    for t in out.values():
        assert t.numel() * t.element_size() <= len(buf)


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(header=st.dictionaries(st.text(max_size=8), st.dictionaries(
    st.sampled_from(["dtype", "shape", "data_offsets", "x"]),
    st.one_of(st.integers(-2**70, 2**70), st.text(max_size=6),
              st.lists(st.integers(-2**70, 2**70), max_size=4))), max_size=3))  # fmt: skip
def test_safetensors_parser_hostile_header(header):
    """Headers with huge/negative offsets and shapes, wrong types, unknown dtypes
    (200 examples): WeightUpdateError or a tensor inside the buffer, never a crash."""
    import json

    raw = json.dumps(header).encode()
    buf = bytearray(len(raw).to_bytes(8, "little") + raw + bytes(64))
    try:
        out = load_safetensors_bytes(buf)
    except WeightUpdateError:
        return
    for t in out.values():
        assert t.numel() * t.element_size() <= 64


# Found by the fuzz: values that pass pydantic and SamplingParams but do not fit the
# sampler's batch tensors (top_p -> float32 0.0 empties the nucleus, top_k -> int64
# overflow). Each used to fail the whole batch's step, killing every running request.
EDGE = [
    {"top_p": 1e-50, "temperature": 1.0},
    {"top_k": 2**63},
    {"top_k": 2**70},
]


@pytest.mark.parametrize("extra", EDGE, ids=["top_p_1e-50", "top_k_2^63", "top_k_2^70"])
def test_unrepresentable_sampling_values_are_400(server, extra):
    """Such a request is a 400 (both APIs), and a request streaming alongside it finishes."""
    import httpx

    srv, _ = server
    with httpx.Client(base_url=srv.url, timeout=60) as http:
        with http.stream("POST", "/generate", json={"input_ids": [1, 2], "stream": True,
                         "sampling_params": {"max_new_tokens": 40, "ignore_eos": True}}) as bystander:  # fmt: skip
            lines = bystander.iter_lines()
            assert next(x for x in lines if x.startswith("data: {"))
            r = http.post("/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 4} | extra)
            assert r.status_code == 400, r.text
            sp = {"max_new_tokens": 4} | extra
            r = http.post("/generate", json={"input_ids": [1, 2, 3], "sampling_params": sp})
            assert r.status_code == 400, r.text
            events = [x for x in lines if x.startswith("data: ")]
        assert events[-1] == "data: [DONE]" and "error" not in events[-2]
        assert len(json.loads(events[-2][6:])["output_ids"]) == 40


@pytest.mark.parametrize("route", ["/update_weights_from_disk", "/pause_generation",
                                   "/init_weights_update_group", "/update_weights_from_tensor"])  # fmt: skip
def test_admin_auth_precedes_body_parsing(server, route):
    """Found by the fuzz: without a token, malformed JSON or an oversized body to an admin
    route is 401 (not 400/413) — the token is checked before the body is read; a wrong
    token is 401 too, and the right token reaches the route's own validation (400)."""
    import httpx

    srv, _ = server
    bad = {"content-type": "application/json"}
    with httpx.Client(base_url=srv.url, timeout=30) as http:
        for headers in (bad, bad | {"Authorization": "Bearer wrong"}):
            assert http.post(route, content=b'{"x": [1,', headers=headers).status_code == 401
            big = b"[" + b"1," * 200_000 + b"1]"  # > max_body_bytes (256 KiB)
            assert http.post(route, content=big, headers=headers).status_code == 401
        ok = bad | {"Authorization": f"Bearer {TOKEN}"}
        assert http.post(route, content=b'{"x": [1,', headers=ok).status_code == 400


# ------------------------------------------------------- sampling x logprob options
_SAMPLING = st.fixed_dictionaries(
    {},
    optional={
        "temperature": st.sampled_from([0.0, 1e-6, 0.5, 1.0, 2.0]) | st.floats(0.0, 2.0),
        "top_p": st.sampled_from([1.0, 0.5, 0.01]) | st.floats(0.01, 1.0),
        "top_k": st.sampled_from([-1, 0, 1, 2, 5, 100]),
        "min_p": st.sampled_from([0.0, 0.5, 1.0]) | st.floats(0.0, 1.0),
        "seed": st.integers(0, 2**31),
        "ignore_eos": st.booleans(),
    },
)


def _strict_json(text: str):
    def refuse(name: str):
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


def _request(route: str, sampling: dict, k: int, n: int, stream: bool,
             scoring: tuple[bool, bool, bool] = (False, False, False)) -> dict:  # fmt: skip
    """One request of `route` with these sampling params, k top logprobs, n samples, and
    scoring = (score the prompt, generate nothing, chosen-id logprobs) where the route has it."""
    score, zero, ids = scoring
    length = 0 if score and zero else 3
    if route == "/generate":
        sp = {("sampling_seed" if key == "seed" else key): v for key, v in sampling.items()}
        body = {"input_ids": [1, 2, 3], "return_logprob": True, "top_logprobs_num": k,
                "stream": stream, "sampling_params": sp | {"max_new_tokens": length, "n": n}}  # fmt: skip
        if score:
            body["logprob_start_len"] = 1
        return body | ({"token_ids_logprob": [1, 5]} if ids else {})
    body = sampling | {"model": "tiny", "max_tokens": 3, "n": n, "stream": stream}
    if route == "/v1/completions":
        extra = {"echo": True, "max_tokens": length} if score else {}
        return body | {"prompt": [1, 2, 3], "logprobs": k} | extra | (
            {"logprob_token_ids": [1, 5]} if ids else {})  # fmt: skip
    return body | {"messages": [{"role": "user", "content": "Hi"}], "logprobs": True,
                   "top_logprobs": k}  # fmt: skip


@settings(max_examples=80, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))  # fmt: skip
@given(sampling=_SAMPLING, k=st.integers(0, 5), n=st.integers(1, 2), stream=st.booleans(),
       route=st.sampled_from(["/v1/completions", "/v1/chat/completions", "/generate"]),
       scoring=st.tuples(st.booleans(), st.booleans(), st.booleans()))  # fmt: skip
def test_any_valid_sampling_and_logprob_options_answer_valid_json(server, sampling, k, n,
                                                                  stream, route, scoring):  # fmt: skip
    """Issue 15: any valid combination of sampling params (T incl. 0 and ~0, top-k, top-p,
    min-p, seed) and logprob options (0..5 alternatives, n 1..2; prompt scoring by echo /
    logprob_start_len, with or without generating; chosen-id logprobs), on the three
    generation routes, streamed or not, answers 200 with strict JSON (no NaN / Infinity /
    error event) whose logprobs are floats in [−9999, 0]. 80 derandomized examples."""
    import httpx

    srv, _ = server
    body = _request(route, sampling, k, n, stream, scoring)
    with httpx.Client(base_url=srv.url, timeout=BUDGET_S) as http:
        if not stream:
            r = http.post(route, json=body)
            assert r.status_code == 200, (body, r.text)
            replies = [_strict_json(r.text)]
        else:
            with http.stream("POST", route, json=body) as r:
                assert r.status_code == 200, (body, r.read())
                lines = [x[6:] for x in r.iter_lines() if x.startswith("data: ")]
            assert lines[-1] == "[DONE]", lines
            replies = [_strict_json(x) for x in lines[:-1]]
    assert replies and not any(isinstance(x, dict) and "error" in x for x in replies), replies
    lps = _logprob_floats(replies)
    assert lps and all(-9999.0 <= f <= 0.0 for f in lps), lps


def _logprob_floats(reply) -> list[float]:
    """Every logprob of one reply or stream event, in the route's own spelling."""
    if isinstance(reply, list):
        return [f for x in reply for f in _logprob_floats(x)]
    if "meta_info" in reply:  # SGLang: [logprob, token_id, text] triples
        meta = reply["meta_info"]
        triples = meta.get("output_token_logprobs", []) + meta.get("input_token_logprobs", [])
        for key in ("output_top_logprobs", "input_top_logprobs", "input_token_ids_logprobs",
                    "output_token_ids_logprobs"):  # fmt: skip
            triples += [t for step in meta.get(key, []) if step for t in step]
        return [t[0] for t in triples if t[0] is not None]
    out = []
    for c in reply.get("choices", []):
        lp = c.get("logprobs") or {}
        if "content" in lp:  # chat
            for t in lp["content"] or []:
                out += [t["logprob"]] + [a["logprob"] for a in t["top_logprobs"]]
        else:
            out += [x for x in lp.get("token_logprobs", []) if x is not None]
            out += [v for top in lp.get("top_logprobs", []) if top for v in top.values()]
    return out
