"""Penalties, logit_bias and min_tokens through the server: the fields RL and eval configs send
reach the engine (OpenAI and SGLang spellings) instead of a 400."""

from __future__ import annotations

import httpx
import pytest

from bebop_spec import LLM, SamplingParams
from bebop_spec.server.testing import serve_model
from bebop_spec.testing import make_tiny_model

PROMPT = [5, 9, 11, 4, 7]
EOS = 63  # make_tiny_model's default: the last id


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("pen") / "m", vocab_size=64, seed=0)


def _engine_greedy(llm: LLM, **kw) -> list[int]:
    params = SamplingParams(temperature=0.0, **kw)
    return llm.generate([PROMPT], params)[0].outputs[0].token_ids


def test_penalty_payloads_are_served_as_the_engine_samples(model_dir):
    """Invariant: an OpenAI completions payload with frequency_penalty / presence_penalty /
    logit_bias and an SGLang /generate payload with repetition_penalty / min_new_tokens (and
    logit_bias boosting EOS) return 200 with exactly the offline engine's greedy tokens under
    the same SamplingParams, and those differ from the unpenalised ones (the values arrived)."""
    llm = LLM(str(model_dir), draft_mode=None)
    oai = {"prompt": PROMPT, "max_tokens": 12, "temperature": 0, "return_token_ids": True,
           "frequency_penalty": 1.5, "presence_penalty": 0.5, "logit_bias": {"7": 3.0},
           "ignore_eos": True}  # fmt: skip
    oai_ref = _engine_greedy(llm, max_tokens=12, frequency_penalty=1.5, presence_penalty=0.5,
                             logit_bias={7: 3.0}, ignore_eos=True)  # fmt: skip
    assert oai_ref != _engine_greedy(llm, max_tokens=12, ignore_eos=True)
    sgl = {"input_ids": PROMPT, "sampling_params": {
        "temperature": 0, "max_new_tokens": 12, "repetition_penalty": 1.5, "min_new_tokens": 6,
        "logit_bias": {str(EOS): 8.0}}}  # fmt: skip
    sgl_ref = _engine_greedy(llm, max_tokens=12, repetition_penalty=1.5, min_tokens=6,
                             logit_bias={EOS: 8.0})  # fmt: skip
    unforced = _engine_greedy(llm, max_tokens=12, repetition_penalty=1.5, logit_bias={EOS: 8.0})
    assert len(unforced) < 6 <= len(sgl_ref)  # min_new_tokens is what keeps it going
    with serve_model(str(model_dir), str(model_dir / "mtp"), engine={"max_model_len": 128}) as (
        srv, _,
    ), httpx.Client(base_url=srv.url, timeout=60) as http:  # fmt: skip
        r = http.post("/v1/completions", json=oai)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["token_ids"] == oai_ref
        r = http.post("/generate", json=sgl)
        assert r.status_code == 200, r.text
        assert r.json()["output_ids"] == sgl_ref
