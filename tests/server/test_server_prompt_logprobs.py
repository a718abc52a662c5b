"""Prompt logprobs over HTTP (issue 15, point 3), replaying what lm-evaluation-harness 0.4.13
sends for loglikelihood / multiple-choice tasks, and parsing the reply as it does:

- `local-completions` (lm_eval/models/openai_completions.py): {prompt: ids, temperature: 0,
  max_tokens: 1, logprobs: 1, seed, echo: true}; it sums token_logprobs[ctxlen:-1] and calls
  the continuation greedy when each token's logprob is the max of its top_logprobs.
- `sglang-generate` (lm_eval/models/sglang_generate_API.py): {input_ids, sampling_params:
  {max_new_tokens: 1, temperature: 0}, logprob_start_len: 0, top_logprobs_num: 1,
  return_logprob: true}; it sums meta_info.input_token_logprobs[ctxlen:][0].

The reference is transformers' forward of the same ids on the same weights (|Δ| < 1e-4, fp32).
Server: tiny random Qwen3 with a byte-level BPE tokenizer, with and without speculation.
"""

from __future__ import annotations

import json

import httpx
import pytest
import torch

from bebop_spec.server.testing import serve_model

TOL = 1e-4
CONTEXT = [5, 17, 33, 2, 90, 41, 8, 8, 120, 64, 3, 77, 19, 200, 11, 6, 9]
CONTINUATION = [42, 7, 130, 55]
IDS = CONTEXT + CONTINUATION


@pytest.fixture(scope="module", params=[None, "rs"])
def server(request, tiny_text_model):
    engine = {"draft_mode": request.param, "max_model_len": 128, "block_size": 8}
    mtp = str(tiny_text_model / "mtp") if request.param else None
    with serve_model(str(tiny_text_model), mtp, engine=engine) as (srv, _):
        yield srv


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def ref(tiny_text_model):
    """ref[i] = log p(IDS[i] | IDS[:i]) for i >= 1 under transformers; ref[0] = None."""
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(str(tiny_text_model), dtype=torch.float32)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([IDS])).logits[0].float(), -1)
    return [None] + [float(logp[i - 1, IDS[i]]) for i in range(1, len(IDS))], logp


def _strict(text: str):
    def refuse(name: str):
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


def _close(got, want) -> bool:
    return all(
        (g is None) == (w is None) and (g is None or abs(g - w) < TOL)
        for g, w in zip(got, want, strict=True)
    )


def test_lm_eval_local_completions_loglikelihood(http, ref):
    """lm-eval's exact payload answers 200; token_logprobs holds the prompt's scores (null
    first) then the generated token's; the continuation's summed logprob and greedy flag,
    parsed as lm-eval parses them, equal transformers'."""
    body = {"model": None, "prompt": IDS, "temperature": 0, "max_tokens": 1, "logprobs": 1,
            "seed": 1234, "echo": True}  # fmt: skip
    r = http.post("/v1/completions", json={k: v for k, v in body.items() if v is not None})
    assert r.status_code == 200, r.text
    choice = _strict(r.text)["choices"][0]
    lps = choice["logprobs"]
    assert len(lps["token_logprobs"]) == len(IDS) + 1
    assert _close(lps["token_logprobs"][: len(IDS)], ref[0])
    assert lps["top_logprobs"][0] is None
    ctxlen = len(CONTEXT)
    total = sum(lps["token_logprobs"][ctxlen:-1])
    assert abs(total - sum(ref[0][ctxlen:])) < 4 * TOL
    greedy = all(
        tok == max(top.values())
        for tok, top in zip(
            lps["token_logprobs"][ctxlen:-1], lps["top_logprobs"][ctxlen:-1], strict=True
        )  # fmt: skip
    )
    logp = ref[1]
    want = all(int(logp[i - 1].argmax()) == IDS[i] for i in range(ctxlen, len(IDS)))
    assert greedy == want
    offsets = lps["text_offset"]
    assert offsets == sorted(offsets) and offsets[0] == 0


def test_lm_eval_sglang_generate_loglikelihood(http, ref):
    """lm-eval's sglang-generate payload answers 200 with input_token_logprobs for every
    prompt token (null first) and input_top_logprobs; the continuation's sum equals
    transformers'."""
    body = {"input_ids": IDS, "sampling_params": {"max_new_tokens": 1, "temperature": 0},
            "logprob_start_len": 0, "top_logprobs_num": 1, "return_logprob": True}  # fmt: skip
    r = http.post("/generate", json=body)
    assert r.status_code == 200, r.text
    meta = _strict(r.text)["meta_info"]
    inp = meta["input_token_logprobs"]
    assert [x[1] for x in inp] == IDS
    assert _close([x[0] for x in inp], ref[0])
    assert meta["input_top_logprobs"][0] is None and len(meta["input_top_logprobs"]) == len(IDS)
    ctxlen = len(CONTEXT)
    assert abs(sum(x[0] for x in inp[ctxlen:]) - sum(ref[0][ctxlen:])) < 4 * TOL
    assert len(meta["output_token_logprobs"]) == 1


@pytest.mark.parametrize("start", [3, 12])
def test_sglang_logprob_start_len_and_token_ids(http, ref, start):
    """logprob_start_len = k returns positions k..P-1, the first null (SGLang's rows start
    at k); max_new_tokens = 0 scores without generating; token_ids_logprob gives the chosen
    ids' raw logprobs at each prompt position and processed ones at each output position."""
    body = {"input_ids": IDS, "sampling_params": {"max_new_tokens": 0}, "return_logprob": True,
            "logprob_start_len": start, "token_ids_logprob": [1, 42]}  # fmt: skip
    meta = _strict(http.post("/generate", json=body).text)["meta_info"]
    inp = meta["input_token_logprobs"]
    assert [x[1] for x in inp] == IDS[start:] and inp[0][0] is None
    assert _close([x[0] for x in inp[1:]], ref[0][start + 1 :])
    assert meta["completion_tokens"] == 0
    chosen = meta["input_token_ids_logprobs"]
    assert chosen[0] is None
    for j, row in enumerate(chosen[1:], start + 1):
        assert [x[1] for x in row] == [1, 42]
        assert all(abs(x[0] - float(ref[1][j - 1, x[1]])) < TOL for x in row)
    gen = {"input_ids": IDS, "sampling_params": {"max_new_tokens": 3, "temperature": 0.7},
           "return_logprob": True, "token_ids_logprob": [1, 42]}  # fmt: skip
    meta = _strict(http.post("/generate", json=gen).text)["meta_info"]
    assert meta["input_token_logprobs"] == [] and len(meta["output_token_ids_logprobs"]) == 3


def test_vllm_prompt_logprobs_field_and_echo_without_generation(http, ref):
    """vLLM's `prompt_logprobs` choice field: null first, then {id: {logprob, rank,
    decoded_token}} holding the prompt token (its rank in the vocabulary) and the top-2;
    `echo` with max_tokens=0 returns the prompt's text and scores and no completion."""
    body = {"prompt": IDS, "max_tokens": 0, "echo": True, "logprobs": 2, "prompt_logprobs": 2}
    choice = _strict(http.post("/v1/completions", json=body).text)["choices"][0]
    assert choice["finish_reason"] == "length"
    assert len(choice["logprobs"]["tokens"]) == len(IDS)
    pl = choice["prompt_logprobs"]
    assert pl[0] is None and len(pl) == len(IDS)
    logp = ref[1]
    for i in range(1, len(IDS)):
        entry = pl[i][str(IDS[i])]
        assert abs(entry["logprob"] - ref[0][i]) < TOL
        assert entry["rank"] == int((logp[i - 1] > logp[i - 1, IDS[i]]).sum()) + 1
        assert set(logp[i - 1].topk(2).indices.tolist()) <= {int(k) for k in pl[i]}


def test_echo_streams_the_prompt_first(http):
    """A streamed echo sends the prompt's text (and scores) in each choice's first chunk;
    the concatenated text equals the non-streamed echo's."""
    body = {"prompt": IDS, "max_tokens": 4, "echo": True, "logprobs": 0, "temperature": 0}
    whole = _strict(http.post("/v1/completions", json=body).text)["choices"][0]
    with http.stream("POST", "/v1/completions", json=body | {"stream": True}) as r:
        assert r.status_code == 200
        events = [_strict(x[6:]) for x in r.iter_lines() if x.startswith("data: {")]
    text = "".join(c["text"] for e in events for c in e["choices"])
    assert text == whole["text"]
    lps = [v for e in events for c in e["choices"] for v in c["logprobs"]["token_logprobs"]]
    assert lps == whole["logprobs"]["token_logprobs"]


@pytest.mark.parametrize(
    "body, param",
    [
        ({"prompt": IDS, "max_tokens": 0}, "max_tokens"),
        ({"prompt": IDS, "prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
        ({"prompt": IDS, "logprob_token_ids": [1]}, "logprob_token_ids"),
        ({"prompt": IDS, "prompt_logprobs": 10_000}, "prompt_logprobs"),
    ],
)
def test_bad_scoring_requests_are_4xx(http, body, param):
    """vLLM's rules: max_tokens=0 needs echo; prompt_logprobs cannot stream; logprob_token_ids
    needs logprobs; limits apply. Each is a 400 naming the parameter."""
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_sglang_start_past_the_prompt_is_400(http):
    """logprob_start_len at or past the prompt's end is a 400, not a 500."""
    body = {"input_ids": IDS, "return_logprob": True, "logprob_start_len": len(IDS)}
    r = http.post("/generate", json=body)
    assert r.status_code == 400, r.text
