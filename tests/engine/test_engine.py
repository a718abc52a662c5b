"""Embedded engine: greedy equivalence, KV rollback, stop conditions, n, abort, bad input."""

from __future__ import annotations

import pytest
import torch

from bebop_spec import LLM, SamplingParams
from bebop_spec.errors import InvalidRequest

PROMPTS = [[1, 2, 3], [5, 9, 11, 4, 7, 8, 2], [40], [17, 18, 19, 20, 21]]


@pytest.fixture(scope="module")
def llms(tiny_model):
    # Fixed γ: these tests pin seeded reproducibility and drafting every step; the auto
    # policy has its own tests (test_engine_gamma.py) and is in the greedy check below.
    kw = {"mtp": str(tiny_model / "mtp"), "num_speculative_tokens": 3, "spec_policy": "fixed"}
    return {
        "none": LLM(str(tiny_model), draft_mode=None),
        "rs": LLM(str(tiny_model), draft_mode="rs", **kw),
        "to": LLM(str(tiny_model), draft_mode="to", **kw),
        "rs-auto": LLM(str(tiny_model), draft_mode="rs", **{**kw, "spec_policy": "auto"}),
    }


def _greedy(n=24, **kw):
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, **kw)


def test_plain_greedy_matches_transformers(llms, tiny_model):
    """Greedy decoding without speculation equals transformers' greedy generate token for token."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32).eval()
    for prompt in PROMPTS:
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False,
                          eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()  # fmt: skip
        ours = llms["none"].generate([prompt], _greedy(16))[0].outputs[0].token_ids
        assert ours == ref


@pytest.mark.parametrize("mode", ["rs", "to", "rs-auto"])
def test_greedy_with_speculation_equals_without(llms, mode):
    """Greedy + speculation (a random, mostly-wrong head) equals plain greedy, alone and batched."""
    ref = [o.outputs[0].token_ids for o in llms["none"].generate(PROMPTS, _greedy())]
    batched = [o.outputs[0].token_ids for o in llms[mode].generate(PROMPTS, _greedy())]
    alone = [llms[mode].generate([p], _greedy())[0].outputs[0].token_ids for p in PROMPTS]
    assert batched == ref
    assert alone == ref
    assert llms[mode].spec_stats.num_drafts > 0


@pytest.mark.parametrize("mode", ["rs", "to"])
def test_logits_after_rollbacks_equal_fresh_forward(llms, tiny_model, mode):
    """After many rejections (T=1, random head), the target's log-probs at every emitted
    position equal a fresh full forward over the final sequence (max abs diff < 1e-4)."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32).eval()
    params = SamplingParams(temperature=1.0, max_tokens=40, ignore_eos=True, seed=7,
                            raw_logprobs=True, n=3)  # fmt: skip
    before = llms[mode].spec_stats.num_draft_tokens - llms[mode].spec_stats.num_accepted_tokens
    outs = llms[mode].generate(PROMPTS, params)
    after = llms[mode].spec_stats.num_draft_tokens - llms[mode].spec_stats.num_accepted_tokens
    assert after > before, "the test needs rejections to exercise rollback"
    for prompt, out in zip(PROMPTS, outs, strict=True):
        for c in out.outputs:
            seq = torch.tensor([prompt + c.token_ids])
            with torch.no_grad():
                lp = torch.log_softmax(hf(seq).logits[0].float(), -1)
            ref = lp[len(prompt) - 1 : -1].gather(-1, torch.tensor(c.token_ids)[:, None])[:, 0]
            assert torch.allclose(torch.tensor(c.raw_logprobs), ref, atol=1e-4)


def test_stop_conditions(llms):
    """max_tokens → length; stop_token_ids → stop with the id; EOS stops unless ignore_eos."""
    llm = llms["rs"]
    ref = llm.generate([PROMPTS[1]], _greedy(30))[0].outputs[0]
    assert ref.finish_reason == "length" and len(ref.token_ids) == 30
    target = ref.token_ids[5]
    first = ref.token_ids.index(target)
    out = llm.generate([PROMPTS[1]], _greedy(30, stop_token_ids=[target]))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == target
    assert out.token_ids == ref.token_ids[: first + 1]
    # EOS: make the engine treat `target` as EOS.
    llm.engine.eos_ids.add(target)
    try:
        out = llm.generate([PROMPTS[1]], SamplingParams(temperature=0, max_tokens=30))[0]
        assert out.outputs[0].token_ids == ref.token_ids[: first + 1]
        out = llm.generate([PROMPTS[1]], _greedy(30))[0]
        assert out.outputs[0].token_ids == ref.token_ids
    finally:
        llm.engine.eos_ids.discard(target)


def test_stop_strings(tiny_text_model):
    """A stop string ends generation and is cut from the text (kept with include_stop_str)."""
    llm = LLM(str(tiny_text_model), mtp=str(tiny_text_model / "mtp"), draft_mode="rs")
    ref = llm.generate("Hello world", _greedy(20))[0].outputs[0]
    assert len(ref.text) > 6, ref.text
    stop = ref.text[3:6]
    out = llm.generate("Hello world", _greedy(20, stop=[stop]))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == ref.text[: ref.text.index(stop)]
    out = llm.generate("Hello world", _greedy(20, stop=[stop], include_stop_str_in_output=True))[
        0
    ].outputs[0]
    assert out.text.endswith(stop)


def test_n_samples_differ_and_seed_reproduces(llms):
    """With a seed, n samples differ from each other and the whole output is reproducible."""
    llm = llms["rs"]
    params = SamplingParams(temperature=1.0, max_tokens=20, n=4, seed=123, ignore_eos=True)
    a = [c.token_ids for c in llm.generate([PROMPTS[0]], params)[0].outputs]
    b = [c.token_ids for c in llm.generate([PROMPTS[0]], params)[0].outputs]
    assert a == b
    assert len({tuple(x) for x in a}) == 4
    # reproducible whatever else shares the batch
    c = llm.generate([PROMPTS[0], PROMPTS[1]], params)[0]
    assert [o.token_ids for o in c.outputs] == a


def test_abort_frees_blocks(llms):
    """Aborting a running request frees its KV blocks and reports finish_reason abort."""
    eng = llms["rs"].engine
    eng.add_request("x", PROMPTS[0], SamplingParams(max_tokens=100, n=3, ignore_eos=True))
    eng.step()
    eng.step()
    out = eng.abort("x")
    assert all(c.finish_reason == "abort" for c in out.outputs)
    assert not eng.has_unfinished() and eng.blocks.num_free == eng.blocks.num_blocks


def test_versions_and_logprobs_recorded(llms):
    """Every emitted token carries a weight version, logprob and entropy."""
    out = llms["to"].generate([PROMPTS[2]], SamplingParams(max_tokens=12, logprobs=2,
                                                           ignore_eos=True))[0].outputs[0]  # fmt: skip
    n = len(out.token_ids)
    assert len(out.weight_versions) == len(out.logprobs) == len(out.entropies) == n
    assert all(len(t) == 2 for t in out.top_logprobs)
    assert all(lp <= 0 for lp in out.logprobs)


@pytest.mark.parametrize(
    "kw",
    [{"temperature": -1}, {"top_p": 0}, {"top_p": 1.5}, {"top_k": -2}, {"n": 0},
     {"max_tokens": 0}, {"min_p": 2}],
)  # fmt: skip
def test_bad_sampling_params(kw):
    """Invalid sampling parameters raise ValueError naming the field."""
    with pytest.raises(ValueError, match=next(iter(kw))):
        SamplingParams(**kw)


def test_bad_requests(llms, tiny_model):
    """Too-long prompts, out-of-vocabulary ids and unknown draft modes are clear errors."""
    llm = llms["none"]
    with pytest.raises(InvalidRequest, match="max_model_len"):
        llm.generate([[1] * 600], SamplingParams())
    with pytest.raises(InvalidRequest, match="vocabulary"):
        llm.generate([[1, 64]], SamplingParams())
    with pytest.raises(ValueError, match="draft_mode"):
        LLM(str(tiny_model), draft_mode="greedy")
    with pytest.raises(ValueError, match="threads"):
        LLM(str(tiny_model), threads=0)
