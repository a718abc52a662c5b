"""The OpenAI dialect, exercised with the official `openai` client against a real uvicorn
server (tiny random Qwen3 + byte-level BPE tokenizer with a chat template, MTP head, RS)."""

from __future__ import annotations

import openai
import pytest

from bebop_spec import LLM, SamplingParams
from bebop_spec.server.testing import serve_model
from bebop_spec.testing import make_tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("oai") / "m", with_tokenizer=True, seed=5)


@pytest.fixture(scope="module")
def server(model_dir):
    # Fixed γ: these tests check the spec_* counters, which the auto policy may leave at 0
    # (it can choose plain decoding from measured step costs).
    engine = {"spec_policy": "fixed"}
    with serve_model(str(model_dir), str(model_dir / "mtp"), engine=engine) as (srv, state):
        yield srv, state


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server[0].url}/v1", api_key="unused", max_retries=0)


def test_models_lists_served_name(client):
    """/v1/models names the served model, as the client parses it."""
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_completion_greedy_matches_offline_engine(client, model_dir):
    """A greedy completion equals the offline LLM's output for the same prompt (same weights,
    exact verification), and carries usage, weight version and spec stats."""
    r = client.completions.create(model="tiny", prompt="Hello world", max_tokens=12, temperature=0,
                                  extra_body={"return_token_ids": True, "ignore_eos": True})  # fmt: skip
    choice = r.choices[0]
    llm = LLM(str(model_dir), mtp=str(model_dir / "mtp"))
    ref = llm.generate(
        ["Hello world"], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    )
    assert choice.token_ids == ref[0].outputs[0].token_ids
    assert choice.text == ref[0].outputs[0].text
    assert r.usage.completion_tokens == 12 and r.usage.prompt_tokens == len(choice.prompt_token_ids)
    extra = r.model_extra
    assert extra["weight_version"] == "default" and extra["spec_stats"]["num_drafts"] > 0
    assert choice.model_extra["weight_versions"] == [{"version": "default", "start": 0, "end": 12}]


def test_completion_n_and_logprobs(client):
    """n samples come back as n choices; logprobs list one entry per token with top-k."""
    r = client.completions.create(model="tiny", prompt=["The quick", "Hello"], max_tokens=5, n=3,
                                  logprobs=2, seed=1, extra_body={"ignore_eos": True})  # fmt: skip
    assert sorted(c.index for c in r.choices) == list(range(6))
    for c in r.choices:
        assert len(c.logprobs.tokens) == 5 == len(c.logprobs.token_logprobs)
        assert all(lp <= 0 for lp in c.logprobs.token_logprobs)
        assert all(len(top) >= 1 for top in c.logprobs.top_logprobs)
    assert r.usage.completion_tokens == 30


def test_completion_stream_reassembles(client):
    """Streamed deltas concatenate to the non-streamed text (same seed), ending with [DONE]."""
    kw = dict(model="tiny", prompt="The quick", max_tokens=10, seed=7, temperature=1.0,
              extra_body={"ignore_eos": True})  # fmt: skip
    whole = client.completions.create(**kw).choices[0].text
    chunks = list(
        client.completions.create(stream=True, stream_options={"include_usage": True}, **kw)
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole
    assert chunks[-1].usage.completion_tokens == 10
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_chat_uses_template_and_streams(client, model_dir):
    """Chat renders the tokenizer's template; stream and non-stream agree for a seeded request."""
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    kw = dict(model="tiny", messages=msgs, max_tokens=8, seed=3,
              extra_body={"ignore_eos": True, "return_token_ids": True})  # fmt: skip
    r = client.chat.completions.create(**kw)
    assert r.choices[0].message.role == "assistant"
    llm = LLM(str(model_dir), mtp=str(model_dir / "mtp"))
    prompt = llm.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert (
        r.model_extra["prompt_token_ids"]
        == llm.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    )
    stream = client.chat.completions.create(stream=True, **kw)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == r.choices[0].message.content


def test_chat_logprobs_and_n(client):
    """Chat logprobs: one entry per generated token with the requested top alternatives."""
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                       max_tokens=4, n=2, logprobs=True, top_logprobs=3,
                                       extra_body={"ignore_eos": True})  # fmt: skip
    assert len(r.choices) == 2
    for c in r.choices:
        assert len(c.logprobs.content) == 4
        assert all(len(t.top_logprobs) == 3 for t in c.logprobs.content)


def test_client_errors_are_openai_errors(client):
    """Client mistakes surface as the client's typed errors (4xx), never 500."""
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x", max_tokens=1)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="x", max_tokens=1, temperature=-1)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[], max_tokens=1)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="x", max_tokens=100_000)


def test_stop_string_truncates(client):
    """A stop string ends the completion right before its first occurrence (same seed, same
    tokens up to there), with finish_reason stop."""
    kw = dict(model="tiny", prompt="Hello", max_tokens=24, seed=11, extra_body={"ignore_eos": True})
    text = client.completions.create(**kw).choices[0].text
    stop = next((text[i : i + 2] for i in range(2, len(text) - 2) if text[i : i + 2].strip()), None)
    if stop is None:
        pytest.skip("sampled text too short for a stop string")
    r = client.completions.create(stop=[stop], **kw).choices[0]
    assert r.text == text[: text.find(stop)] and r.finish_reason == "stop"


def test_generate_with_text_and_logprob_text(server):
    """SGLang /generate with `text` on a tokenizer model: text out, and logprob triples carry
    token text when return_text_in_logprobs is set."""
    import httpx

    body = {"text": "Hello world", "return_logprob": True, "return_text_in_logprobs": True,
            "sampling_params": {"max_new_tokens": 6, "ignore_eos": True, "temperature": 0}}  # fmt: skip
    out = httpx.post(f"{server[0].url}/generate", json=body, timeout=60).json()
    triples = out["meta_info"]["output_token_logprobs"]
    assert [t for _, t, _ in triples] == out["output_ids"] and len(out["output_ids"]) == 6
    assert all(
        isinstance(text, str) for *_, text in triples
    )  # per-token decode (may be partial UTF-8)
    assert out["text"]


def test_skip_special_tokens(client, model_dir):
    """Special tokens are left out of the text by default (OpenAI / vLLM) and kept with
    skip_special_tokens=false, in completions and chat alike: a +100 logit bias on EOS with
    ignore_eos makes greedy decoding emit exactly three <|im_end|> tokens."""
    from transformers import AutoTokenizer

    eos = AutoTokenizer.from_pretrained(str(model_dir)).eos_token_id
    kw = dict(model="tiny", max_tokens=3, temperature=0, logit_bias={str(eos): 100})
    for skip, text in ((True, ""), (False, "<|im_end|>" * 3)):
        body = {"ignore_eos": True, "skip_special_tokens": skip}
        c = client.completions.create(prompt="Hello", extra_body=body, **kw).choices[0]
        m = client.chat.completions.create(messages=[{"role": "user", "content": "Hi"}],
                                           extra_body=body, **kw).choices[0].message  # fmt: skip
        assert c.text == text and m.content == text
